"""Turn an evaluation into what people read: markdown tables and PNGs.

Kept apart from the orchestration so the tables can be re-rendered from ``evaluation.json``
without re-running anything, and so the numbers and their presentation cannot get mixed up.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.detection_metrics import roc_curve

if TYPE_CHECKING:
    from training.evaluate import EvalReport

# dataset -> attack -> (is_poison, detector -> scores) at the highest evaluated rate.
Curves = dict[str, dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]]

OURS = "depois-fused"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _attack_label(attack: str, clean_label: bool) -> str:
    return f"{attack} (clean-label)" if clean_label else attack


def tpr_table(report: EvalReport, dataset: str) -> str:
    """TPR at the target clean FPR per detector, best baseline marked, goal verdict per row."""
    rows = [r for r in report.detection if r.dataset == dataset]
    detectors = list(dict.fromkeys(r.detector for r in rows))
    goals = {(g.attack, g.rate): g for g in report.goals() if g.dataset == dataset}
    body = []
    for (attack, rate), goal in goals.items():
        cell = {r.detector: r.metrics.tpr_at_fpr for r in rows if (r.attack, r.rate) == (attack, rate)}
        verdict = ("yes" if goal.beats_baselines else
                   f"tie ({goal.best_baseline})" if goal.fused_tpr == goal.best_baseline_tpr else
                   f"no ({goal.best_baseline})")
        body.append([_attack_label(attack, goal.clean_label), f"{rate:.2f}"]
                    + [(f"**{_pct(cell[d])}**" if d == OURS else _pct(cell[d])) for d in detectors] + [verdict])
    return _table(["attack", "rate", *detectors, "fused beats every baseline"], body)


def downstream_table(report: EvalReport, dataset: str) -> str:
    """Victim accuracy on the held-out part after training on each version of the stream."""
    body = []
    for d in (d for d in report.downstream if d.dataset == dataset):
        gap = d.filtered.accuracy - d.clean.accuracy
        asr = ("" if d.poisoned.backdoor_success is None else
               f"{_pct(d.poisoned.backdoor_success)} / {_pct(d.filtered.backdoor_success)} / {_pct(d.clean.backdoor_success)}")
        body.append([
            _attack_label(d.attack, d.clean_label), f"{d.rate:.2f}", _pct(d.poisoned.accuracy),
            _pct(d.filtered.accuracy), _pct(d.clean.accuracy), f"{100 * gap:+.1f}",
            "yes" if gap >= -0.01 else "no", f"{d.removed_poisons} / {d.removed_clean}", asr,
        ])
    return _table(["attack", "rate", "acc poisoned", "acc filtered", "acc poisons removed", "filtered - removed (pt)",
                   "within 1 pt", "removed poisons / clean", "backdoor ASR poisoned / filtered / poisons removed"], body)


def detail_table(report: EvalReport, dataset: str) -> str:
    """Every metric of every detector (poison = positive class; boundary = detector's own)."""
    body = [
        [_attack_label(r.attack, r.clean_label), f"{r.rate:.2f}", r.detector, r.role, _pct(r.metrics.precision),
         _pct(r.metrics.recall), _pct(r.metrics.f1), _pct(r.metrics.clean_fpr), f"{r.metrics.auroc:.3f}",
         _pct(r.metrics.tpr_at_fpr)]
        for r in report.detection if r.dataset == dataset
    ]
    return _table(["attack", "rate", "detector", "role", "precision", "recall", "F1", "clean FPR", "AUROC",
                   "TPR@1%FPR"], body)


def render_markdown(report: EvalReport) -> str:
    parts = []
    for s in report.datasets:
        parts += [
            f"## {s.name}",
            (
                f"stream {s.stream} test images, victim held-out {s.holdout}, trusted-train {s.trusted}, "
                f"calibration {s.calibration}; OOD donor: {s.ood_donor}; detector fit {s.fit_seconds:.0f} s, "
                f"evaluation {s.eval_seconds:.0f} s. All numbers in %, poison = positive class. Victim accuracy "
                f"on the unattacked stream: {_pct(s.unattacked_accuracy)} "
                f"(mean of {report.config.victim_seeds} seed(s))."
            ),
            "### TPR at 1 % clean FPR", tpr_table(report, s.name),
            "### Victim classifier (trained on each version of the stream, tested on the held-out part)", downstream_table(report, s.name),
            "### All detection metrics (each detector at its own boundary)", detail_table(report, s.name),
        ]
    return "\n\n".join(parts) + "\n"


def save_plots(curves: Curves, out: Path) -> list[Path]:
    """Per data set: fused-score histograms (clean vs poison) and ROC curves, one panel per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dataset, attacks in curves.items():
        cols = min(4, len(attacks))
        rows = -(-len(attacks) // cols)
        for kind in ("histograms", "roc"):
            fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
            for ax, (attack, (is_poison, scores)) in zip(axes.flat, attacks.items()):
                if kind == "histograms":
                    bins = np.histogram_bin_edges(scores[OURS], bins=40)
                    ax.hist(scores[OURS][~is_poison], bins=bins, alpha=0.6, label="clean", density=True)
                    ax.hist(scores[OURS][is_poison], bins=bins, alpha=0.6, label="poison", density=True)
                    ax.set_xlabel("fused score (higher = trusted)")
                else:
                    for name, s in scores.items():
                        fpr, tpr = roc_curve(is_poison, s)
                        ax.plot(fpr, tpr, label=name, lw=2 if name == OURS else 1)
                    ax.set_xscale("log")
                    ax.set_xlim(1e-3, 1)
                    ax.set_xlabel("clean FPR (log)")
                    ax.set_ylabel("poison TPR")
                ax.set_title(attack)
                ax.legend(fontsize=7)
            for ax in list(axes.flat)[len(attacks):]:
                ax.axis("off")
            fig.suptitle(f"{dataset}: {kind} at the highest evaluated poison rate")
            fig.tight_layout()
            path = out / f"{dataset}_{kind}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written
