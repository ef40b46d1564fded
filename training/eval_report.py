"""Turn an evaluation into what people read: markdown tables and PNGs.

Kept apart from the orchestration so the tables can be re-rendered from ``evaluation.json``
without re-running anything, and so the numbers and their presentation cannot get mixed up.
Imports only the result schema (``training.eval_schema``), never ``training.evaluate``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from training.detection_metrics import roc_curve
from training.eval_schema import OURS, EvalReport

# dataset -> attack -> (is_poison, detector -> scores) at the highest evaluated rate, first seed.
Curves = dict[str, dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]]


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _pm(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return _pct(values[0])
    return f"{_pct(float(np.mean(values)))} ± {100 * float(np.std(values)):.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _attack_label(attack: str, clean_label: bool) -> str:
    return f"{attack} (clean-label)" if clean_label else attack


def summary_table(report: EvalReport) -> str:
    """One row per data set: the goal numbers (non-clean-label cases, means over seeds)."""
    body = []
    for name in dict.fromkeys(s.name for s in report.datasets):
        goals = [g for g in report.goals() if g.dataset == name and not g.clean_label]
        ours = report.ours(name)
        summaries = [s for s in report.datasets if s.name == name]
        realised = [s.realised_fpr.get(ours, float("nan")) for s in summaries]
        previous = [report.mean(name, g.attack, g.rate, "previous-fused") for g in goals]
        per_seed = []
        for seed in dict.fromkeys(s.seed for s in summaries):
            vals = [r.metrics.tpr_at_fpr for r in report.detection
                    if r.dataset == name and r.seed == seed and r.detector == ours and not r.clean_label]
            per_seed.append(float(np.mean(vals)))
        counts = {v: sum(g.verdict == v for g in goals) for v in ("beats", "ties", "loses")}
        body.append([
            name, str(len(summaries)), f"{_pct(float(np.mean([g.ours_tpr for g in goals])))} "
            f"(seeds {', '.join(_pct(v) for v in per_seed)})",
            _pct(float(np.nanmean(previous))) if previous else "n/a",
            _pct(float(np.mean([g.best_baseline_tpr for g in goals]))),
            f"{counts['beats']} / {counts['ties']} / {counts['loses']} of {len(goals)}",
            _pm(realised),
            _pct(float(np.mean([s.card_out_of_sample_fpr for s in summaries if s.card_out_of_sample_fpr is not None])))
            if any(s.card_out_of_sample_fpr is not None for s in summaries) else "n/a",
        ])
    return _table(["data set", "seeds", "union mean TPR@1%FPR (per seed)", "previous fused", "best baseline per case",
                   "union beats / ties / loses best baseline", "realised FPR on the clean stream (mean ± sd)",
                   "out-of-sample FPR in the card"], body)


def tpr_table(report: EvalReport, dataset: str) -> str:
    """TPR at the target clean FPR per detector (mean over seeds), best baseline and verdict."""
    ours = report.ours(dataset)
    columns = report.detectors(dataset, "previous") + report.detectors(dataset, "baseline")
    goals = {(g.attack, g.rate): g for g in report.goals() if g.dataset == dataset}
    body = []
    for (attack, rate), g in goals.items():
        tprs = report.values(dataset, attack, rate, ours)
        cells = [_pct(report.mean(dataset, attack, rate, d)) for d in columns]
        margin = 100 * (g.ours_tpr - g.best_baseline_tpr)
        body.append([_attack_label(attack, g.clean_label), f"{rate:.2f}", f"**{_pm(tprs)}**", *cells,
                     f"{g.best_baseline} ({_pct(g.best_baseline_tpr)})", f"{g.verdict} ({margin:+.1f})"])
    return _table(["attack", "rate", ours, *columns, "best baseline", "union vs best"], body)


def f1_table(report: EvalReport, dataset: str) -> str:
    """The union at its deployed boundary (poison = positive class), means over seeds."""
    ours = report.ours(dataset)
    body = []
    for attack, rate, clean_label in report.cases(dataset):
        m = lambda key: report.mean(dataset, attack, rate, ours, key)  # noqa: E731
        body.append([_attack_label(attack, clean_label), f"{rate:.2f}", _pct(m("precision")), _pct(m("recall")),
                     f"**{_pct(m('f1'))}**", _pct(m("clean_fpr")), f"{m('auroc'):.3f}"])
    return _table(["attack", "rate", "precision", "recall", "F1", "clean FPR", "AUROC"], body)


def ablation_table(report: EvalReport, dataset: str) -> str:
    """TPR at 1 % FPR of the union, each member alone and the union without each member."""
    ours = report.ours(dataset)
    columns = report.detectors(dataset, "ablation")
    if not columns:
        return "(ablations not run)"
    body, means = [], {d: [] for d in [ours, *columns]}
    for attack, rate, clean_label in report.cases(dataset):
        row = [_attack_label(attack, clean_label), f"{rate:.2f}"]
        for d in [ours, *columns]:
            v = report.mean(dataset, attack, rate, d)
            if not clean_label:
                means[d].append(v)
            row.append(_pct(v))
        body.append(row)
    body.append(["**mean (not clean-label)**", ""] + [f"**{_pct(float(np.mean(means[d])))}**" for d in [ours, *columns]])
    return _table(["attack", "rate", ours, *columns], body)


def realised_fpr_table(report: EvalReport, dataset: str) -> str:
    """Flag rate on the unattacked stream at each detector's deployed boundary, per seed."""
    summaries = [s for s in report.datasets if s.name == dataset]
    names = [d for d in report.detectors(dataset) if d in summaries[0].realised_fpr]
    body = [[d, *[_pct(s.realised_fpr.get(d)) for s in summaries],
             _pct(float(np.mean([s.realised_fpr.get(d, np.nan) for s in summaries])))] for d in names]
    return _table(["detector", *[f"seed {s.seed}" for s in summaries], "mean"], body)


def downstream_table(report: EvalReport, dataset: str) -> str:
    """Victim accuracy on the held-out part after training on each version of the stream (seed means)."""
    rows = [d for d in report.downstream if d.dataset == dataset]
    if not rows:
        return "(victims not trained: --no-victims)"
    body = []
    for attack, rate, clean_label in report.cases(dataset):
        ds = [d for d in rows if (d.attack, d.rate) == (attack, rate)]
        if not ds:
            continue
        mean = lambda f: float(np.mean([f(d) for d in ds]))  # noqa: E731
        gap = mean(lambda d: d.filtered.accuracy - d.clean.accuracy)
        asr = ""
        if ds[0].poisoned.backdoor_success is not None:
            asr = " / ".join(_pct(mean(lambda d, k=k: getattr(d, k).backdoor_success)) for k in ("poisoned", "filtered", "clean"))
        body.append([
            _attack_label(attack, clean_label), f"{rate:.2f}", _pct(mean(lambda d: d.poisoned.accuracy)),
            _pct(mean(lambda d: d.filtered.accuracy)), _pct(mean(lambda d: d.clean.accuracy)), f"{100 * gap:+.1f}",
            "yes" if gap >= -0.01 else "no",
            f"{mean(lambda d: d.removed_poisons):.0f} / {mean(lambda d: d.removed_clean):.0f}", asr,
        ])
    return _table(["attack", "rate", "acc poisoned", "acc filtered", "acc poisons removed", "filtered - removed (pt)",
                   "within 1 pt", "removed poisons / clean", "backdoor ASR poisoned / filtered / poisons removed"], body)


def detail_table(report: EvalReport, dataset: str) -> str:
    """Every metric of the union, the previous detector and the baselines (seed means)."""
    names = report.detectors(dataset, "ours") + report.detectors(dataset, "previous") + report.detectors(dataset, "baseline")
    body = []
    for attack, rate, clean_label in report.cases(dataset):
        for d in names:
            m = lambda key: report.mean(dataset, attack, rate, d, key)  # noqa: E731
            body.append([_attack_label(attack, clean_label), f"{rate:.2f}", d, _pct(m("precision")), _pct(m("recall")),
                         _pct(m("f1")), _pct(m("clean_fpr")), f"{m('auroc'):.3f}", _pct(m("tpr_at_fpr"))])
    return _table(["attack", "rate", "detector", "precision", "recall", "F1", "clean FPR", "AUROC", "TPR@1%FPR"], body)


def render_markdown(report: EvalReport) -> str:
    parts = ["## Summary", summary_table(report)]
    if report.left_out:
        parts.append("Baselines left out of every comparison below: "
                     + "; ".join(report.left_out) + ".")
    for name in dict.fromkeys(s.name for s in report.datasets):
        summaries = [s for s in report.datasets if s.name == name]
        s0 = summaries[0]
        parts += [
            f"## {name}",
            (
                f"seeds {', '.join(str(s.seed) for s in summaries)}; stream {s0.stream} test images, victim held-out "
                f"{s0.holdout}, trusted pool {s0.trusted}, calibration {s0.calibration} out-of-sample scores "
                f"({s0.plan}); OOD donor: {s0.ood_donor}; detector fit "
                f"{np.mean([s.fit_seconds for s in summaries]):.0f} s, evaluation "
                f"{np.mean([s.eval_seconds for s in summaries]):.0f} s per seed. All numbers in %, poison = positive "
                "class, means over seeds (± one standard deviation where given)."
            ),
            "### TPR at 1 % clean FPR", tpr_table(report, name),
            "### Realised FPR on new clean data (the unattacked stream), each detector at its deployed boundary",
            realised_fpr_table(report, name),
            "### The union at its deployed boundary", f1_table(report, name),
            "### Ablation: TPR at 1 % clean FPR of each member alone and of the union without each member",
            ablation_table(report, name),
            "### Victim classifier (trained on each version of the stream, tested on the held-out part)",
            downstream_table(report, name),
            "### All detection metrics (each detector at its own boundary)", detail_table(report, name),
        ]
    return "\n\n".join(parts) + "\n"


def save_plots(curves: Curves, out: Path) -> list[Path]:
    """Per data set: union score histograms (clean vs poison) and ROC curves, one panel per attack."""
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
                    ax.set_xlabel("union score log min_j p_j / w_j (higher = trusted)")
                else:
                    for name, s in scores.items():
                        fpr, tpr = roc_curve(is_poison, s)
                        ax.plot(fpr, tpr, label=name, lw=2 if name == OURS else 1)
                    ax.set_xscale("log")
                    ax.set_xlim(1e-3, 1)
                    ax.set_xlabel("clean FPR (log)")
                    ax.set_ylabel("poison TPR")
                ax.set_title(attack)
                ax.legend(fontsize=6)
            for ax in list(axes.flat)[len(attacks):]:
                ax.axis("off")
            fig.suptitle(f"{dataset}: {kind} at the highest evaluated poison rate")
            fig.tight_layout()
            path = out / f"{dataset}_{kind}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written
