"""A baseline the environment cannot run is named, never dropped in silence.

Before stop 40, `depois-train evaluate` without the `eval` extra left cleanlab out of every
comparison with no word in the console or the report, so "beats the best baseline" read as if it
had been checked against it (found by a newcomer following the README's install line).
"""

from __future__ import annotations

import sys

from training.baselines import left_out_baselines
from training.eval_report import render_markdown
from training.eval_schema import EvalConfig, EvalReport, merge_reports


def _report(left_out: list[str]) -> EvalReport:
    cfg = EvalConfig(datasets=["digits"], attacks=["random-flip"], rates=[0.2], seeds=[0])
    return EvalReport(config=cfg, datasets=[], detection=[], downstream=[], left_out=left_out)


def test_cleanlab_missing_is_named_with_the_extra_that_installs_it(monkeypatch) -> None:
    for name in ("cleanlab", "cleanlab.filter", "cleanlab.rank"):  # their imports now raise
        monkeypatch.setitem(sys.modules, name, None)
    missing = left_out_baselines()
    assert len(missing) == 1 and "cleanlab" in missing[0] and ".[eval]" in missing[0]


def test_the_report_says_which_baselines_were_left_out_and_merging_keeps_it() -> None:
    text = render_markdown(_report(["cleanlab (confident learning): not installed"]))
    assert "Baselines left out of every comparison below: cleanlab" in text
    assert "left out" not in render_markdown(_report([]))
    merged = merge_reports([_report(["cleanlab: x"]),
                            _report(["cleanlab: x"]).model_copy(update={"datasets": []})])
    assert merged.left_out == ["cleanlab: x"]

