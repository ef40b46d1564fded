"""`depois-stream`: the command-line entry point; each package registers its own commands.

* ``run``: the stream filter (``depois_stream.filter``);
* ``replay``, ``report``: the audit tools (``depois_stream.audit``);
* ``produce``, ``broker``: the simulation kit (``depois_stream.sim``);
* ``version``.

Start-up problems (bad config, bad model, no broker binary) exit with code 2 and one line that
says what to fix, never a traceback.
"""

from __future__ import annotations

import typer

from depois_stream import __version__
from depois_stream.audit.cli import replay_app
from depois_stream.audit.report import report_command
from depois_stream.filter.cli import run
from depois_stream.sim.cli import broker, produce

app = typer.Typer(
    name="depois-stream", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="De-Pois data-poisoning filter for Kafka: score every training sample on its way in, "
         "route it to a clean, quarantine or dead-letter topic.")

app.command("run")(run)
app.command()(produce)
app.command()(broker)
app.add_typer(replay_app, name="replay")
app.command("report")(report_command)


@app.command()
def version() -> None:
    """Print the depois-stream version."""
    typer.echo(__version__)
