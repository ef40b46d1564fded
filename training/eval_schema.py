"""What an evaluation produces: typed rows and the verdicts derived from them.

Kept apart from the orchestration (``training.evaluate``) and from the rendering
(``training.eval_report``) so that both import it and neither imports the other: the tables can
be re-rendered from ``evaluation.json`` without running anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel

from training.detection_metrics import DetectionMetrics
from training.downstream import DownstreamResult


OURS = "depois-union"  # the detector's row name in every table


class EvalConfig(BaseModel):
    datasets: list[str]
    attacks: list[str]
    rates: list[float]
    seeds: list[int] = [0]
    quick: bool = False
    stream_size: int = 3000
    holdout_fraction: float = 1 / 3
    data_dir: Path | None = None
    ood_dir: Path | None = None
    detector_dir: Path | None = None
    device: str = "auto"
    victim_seeds: int = 1
    victims: bool = True
    ablations: bool = True


class DetectionRow(BaseModel):
    dataset: str
    seed: int = 0
    attack: str
    rate: float
    clean_label: bool
    detector: str
    role: str
    metrics: DetectionMetrics


class DownstreamRow(BaseModel):
    dataset: str
    seed: int = 0
    attack: str
    rate: float
    clean_label: bool
    poisoned: DownstreamResult
    filtered: DownstreamResult
    clean: DownstreamResult  # the stream with exactly its poisons removed (a perfect filter)
    removed_poisons: int
    removed_clean: int


class DatasetSummary(BaseModel):
    name: str
    seed: int = 0
    stream: int
    holdout: int
    trusted: int
    calibration: int
    plan: str = ""
    ood_donor: str
    unattacked_accuracy: float | None = None
    fit_seconds: float
    eval_seconds: float = 0.0
    # flag rate of every detector at its deployed boundary on the unattacked stream (new clean data)
    realised_fpr: dict[str, float] = {}
    card_out_of_sample_fpr: float | None = None


Verdict = str  # "beats" | "ties" | "loses"


class GoalRow(BaseModel):
    """One case (data set, attack, rate): our TPR at the target FPR against the best baseline,
    both averaged over the evaluated seeds, and the filtered victim against a perfect filter."""

    dataset: str
    attack: str
    rate: float
    clean_label: bool
    seeds: int
    ours_tpr: float
    ours_tpr_sd: float
    best_baseline: str
    best_baseline_tpr: float
    verdict: Verdict
    ours_f1: float
    accuracy_gap: float | None = None


def verdict(ours: float, best: float) -> Verdict:
    """Exact comparison of seed means (TPRs are ratios of counts; equal means are a real tie)."""
    if np.isclose(ours, best, rtol=0.0, atol=1e-9):
        return "ties"
    return "beats" if ours > best else "loses"


class EvalReport(BaseModel):
    config: EvalConfig
    datasets: list[DatasetSummary]
    detection: list[DetectionRow]
    downstream: list[DownstreamRow]
    left_out: list[str] = []  # baselines this environment could not run, with what brings them back

    def cases(self, dataset: str) -> list[tuple[str, float, bool]]:
        seen: dict[tuple[str, float], bool] = {}
        for r in self.detection:
            if r.dataset == dataset:
                seen.setdefault((r.attack, r.rate), r.clean_label)
        return [(a, rate, cl) for (a, rate), cl in seen.items()]

    def detectors(self, dataset: str, role: str | None = None) -> list[str]:
        return list(dict.fromkeys(r.detector for r in self.detection
                                  if r.dataset == dataset and (role is None or r.role == role)))

    def values(self, dataset: str, attack: str, rate: float, detector: str, metric: str = "tpr_at_fpr") -> list[float]:
        return [float(getattr(r.metrics, metric)) for r in self.detection
                if (r.dataset, r.attack, r.rate, r.detector) == (dataset, attack, rate, detector)]

    def mean(self, dataset: str, attack: str, rate: float, detector: str, metric: str = "tpr_at_fpr") -> float:
        v = self.values(dataset, attack, rate, detector, metric)
        return float(np.mean(v)) if v else float("nan")

    def ours(self, dataset: str) -> str:
        return next(r.detector for r in self.detection if r.dataset == dataset and r.role == "ours")

    def goals(self) -> list[GoalRow]:
        out = []
        for summary_name in dict.fromkeys(s.name for s in self.datasets):
            ours = self.ours(summary_name)
            baselines = self.detectors(summary_name, "baseline")
            for attack, rate, clean_label in self.cases(summary_name):
                tprs = self.values(summary_name, attack, rate, ours)
                means = {b: self.mean(summary_name, attack, rate, b) for b in baselines}
                best = max(means, key=lambda b: means[b])
                gaps = [d.filtered.accuracy - d.clean.accuracy for d in self.downstream
                        if (d.dataset, d.attack, d.rate) == (summary_name, attack, rate)]
                out.append(GoalRow(
                    dataset=summary_name, attack=attack, rate=rate, clean_label=clean_label, seeds=len(tprs),
                    ours_tpr=float(np.mean(tprs)), ours_tpr_sd=float(np.std(tprs)), best_baseline=best,
                    best_baseline_tpr=means[best], verdict=verdict(float(np.mean(tprs)), means[best]),
                    ours_f1=self.mean(summary_name, attack, rate, ours, "f1"),
                    accuracy_gap=float(np.mean(gaps)) if gaps else None,
                ))
        return out


def merge_reports(reports: list[EvalReport]) -> EvalReport:
    """One report from runs of the same suite with different seeds (run in parallel, or one seed
    per fitted detector with ``--detector-dir``). Refuses overlapping (data set, seed) pairs and
    runs of different attack suites, whose means would not be comparable."""
    if not reports:
        raise ValueError("nothing to merge")
    first = reports[0].config
    seen: set[tuple[str, int]] = set()
    for r in reports:
        if (r.config.attacks, r.config.rates) != (first.attacks, first.rates):
            raise ValueError("the runs evaluated different attacks or rates")
        for s in r.datasets:
            if (s.name, s.seed) in seen:
                raise ValueError(f"{s.name} seed {s.seed} appears in two runs")
            seen.add((s.name, s.seed))
    config = first.model_copy(update={
        "datasets": list(dict.fromkeys(d for r in reports for d in r.config.datasets)),
        "seeds": sorted({seed for _, seed in seen}), "detector_dir": None})
    return EvalReport(config=config, datasets=[s for r in reports for s in r.datasets],
                      detection=[d for r in reports for d in r.detection],
                      downstream=[d for r in reports for d in r.downstream],
                      left_out=list(dict.fromkeys(x for r in reports for x in r.left_out)))
