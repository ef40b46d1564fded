"""End to end: `depois-train evaluate --quick` on digits, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.cli import app
from training.downstream import one_thread

BASELINES = ["paper-critic", "knn-vote-10", "knn-ratio-10", "logreg", "mahalanobis-pixels", "trusted-clf", "cleanlab"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, Path]:
    out = tmp_path_factory.mktemp("evaluate")
    # One torch thread: every model here is tiny, and two threads on a 2-core CI box that is also
    # running other work made the quick fit ~6x slower (spinning OpenMP workers).
    with one_thread():
        result = CliRunner().invoke(
            app, ["evaluate", "--quick", "--dataset", "digits", "--attacks", "random_flip,backdoor", "--out", str(out)]
        )
    assert result.exit_code == 0, result.output
    return result.stdout, json.loads((out / "evaluation.json").read_text()), out


def _row(report: dict, attack: str, detector: str) -> dict:
    return next(r for r in report["detection"] if r["attack"] == attack and r["detector"] == detector)


@pytest.mark.slow
def test_fused_score_separates_a_random_flip(quick_run: tuple[str, dict, Path]) -> None:
    _, report, _ = quick_run
    fused = _row(report, "random_flip", "depois-union")
    assert fused["rate"] == 0.2 and fused["metrics"]["poisons"] == round(0.2 * fused["metrics"]["n"])
    assert fused["metrics"]["auroc"] >= 0.95


@pytest.mark.slow
def test_table_lists_every_baseline_and_the_outputs_exist(quick_run: tuple[str, dict, Path]) -> None:
    stdout, report, out = quick_run
    tpr_header = next(line for line in stdout.splitlines() if line.startswith("| attack | rate | depois-union"))
    for name in BASELINES:
        assert name in tpr_header
        assert _row(report, "random_flip", name)["role"] == "baseline"
    assert (out / "digits_histograms.png").stat().st_size > 0 and (out / "digits_roc.png").stat().st_size > 0
    assert (out / "evaluation.md").read_text().strip() in stdout


@pytest.mark.slow
def test_filtering_helps_the_victim(quick_run: tuple[str, dict, Path]) -> None:
    _, report, _ = quick_run
    down = {d["attack"]: d for d in report["downstream"]}
    flip, backdoor = down["random_flip"], down["backdoor"]
    assert flip["filtered"]["accuracy"] > flip["poisoned"]["accuracy"]
    assert backdoor["poisoned"]["backdoor_success"] > 0.5
    assert backdoor["filtered"]["backdoor_success"] < backdoor["poisoned"]["backdoor_success"] / 2


@pytest.mark.slow
def test_runs_of_different_seeds_merge_into_one_report(quick_run: tuple[str, dict, Path],
                                                       tmp_path: Path) -> None:
    """`evaluate-merge`: a run re-labelled as seed 1 next to the original seed 0 gives the same
    means (the two are identical) with two seeds; the same seed twice is refused."""
    _, report, out = quick_run
    other = tmp_path / "seed1"
    other.mkdir()
    shifted = json.loads(json.dumps(report))
    for key in ("datasets", "detection", "downstream"):
        for row in shifted[key]:
            row["seed"] = 1
    (other / "evaluation.json").write_text(json.dumps(shifted))
    merged = tmp_path / "merged"
    result = CliRunner().invoke(app, ["evaluate-merge", str(out), str(other), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    both = json.loads((merged / "evaluation.json").read_text())
    assert both["config"]["seeds"] == [0, 1] and len(both["detection"]) == 2 * len(report["detection"])
    assert [g["ours_tpr"] for g in both["goals"]] == [g["ours_tpr"] for g in report["goals"]]
    assert "seeds 0, 1" in (merged / "evaluation.md").read_text()
    refused = CliRunner().invoke(app, ["evaluate-merge", str(out), str(out), "--out", str(merged)])
    assert refused.exit_code == 2 and "appears in two runs" in refused.output
