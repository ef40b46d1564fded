"""Every `--help` page of both command lines reads like a manual at a plain 80-column terminal:
paragraphs are re-wrapped to the terminal, never broken where the docstring's source lines
happened to end (a newcomer's first contact with the tool)."""

from __future__ import annotations

import click
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from depois_stream.cli import app as stream_app
from training.cli import app as train_app

WIDTH = 80


def _commands(app) -> list[list[str]]:
    """Argument paths of the app itself and of every (sub)command, e.g. ["replay", "list"]."""
    paths: list[list[str]] = [[]]

    def walk(group: click.Command, prefix: list[str]) -> None:
        for name, sub in getattr(group, "commands", {}).items():
            paths.append([*prefix, name])
            walk(sub, [*prefix, name])

    walk(get_command(app), [])
    return paths


def _prose(output: str) -> list[str]:
    """The description lines of a help page: after "Usage:", before the first option or command
    table (rich boxes or click's "Options:" headings)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
    prose = []
    for line in lines[start:]:
        if line.lstrip().startswith(("╭", "│", "╰")) or line.rstrip().endswith(":") and not line.startswith("  "):
            break
        prose.append(line.rstrip())
    return prose


def _ragged(prose: list[str]) -> list[str]:
    """Line pairs where the next line's first word would have fitted on the line before it
    (with a few columns to spare): a break taken from the source, not made by a wrapper."""
    bad = []
    for above, below in zip(prose, prose[1:]):
        if not above.strip() or not below.strip():
            continue
        if len(above) + 1 + len(below.split()[0]) <= WIDTH - 6:
            bad.append(f"{above!r} / {below!r}")
    return bad


@pytest.mark.parametrize("name, app", [("depois-stream", stream_app), ("depois-train", train_app)])
def test_help_paragraphs_are_wrapped_to_the_terminal_not_to_the_source(name: str, app) -> None:
    runner = CliRunner()
    for path in _commands(app):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": str(WIDTH), "TERMINAL_WIDTH": str(WIDTH)},
                               terminal_width=WIDTH)
        assert result.exit_code == 0, (path, result.output)
        prose = _prose(result.output)
        assert any(line.strip() for line in prose), (path, result.output)
        assert max(len(line) for line in result.output.splitlines()) <= WIDTH, (path, result.output)
        assert _ragged(prose) == [], (name, path, _ragged(prose))
