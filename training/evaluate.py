"""``depois-train evaluate``: attack test-split streams, score them with De-Pois and the baselines,
and train the victim on what each detector lets through.

Per data set: fit (or load) the detector on the train split, fit the baselines on its trusted
pool, cut the *test* split into a stream and a held-out part, then for every attack and rate
poison the stream, score it with every detector, and train the victim classifier on the poisoned,
the depois-filtered stream and the stream with exactly its poisons removed; accuracy is measured
on the held-out part. Poisons *replace* stream slots (an attacker's message takes the place of a
legitimate one), so "clean" means the legitimate messages that remain, the best any filter can
do. Nothing is tuned on the test split: every boundary comes from the calibration part of the
trusted pool.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from pydantic import BaseModel
from tqdm import tqdm

from training.attacks import ATTACKS, CollisionConfig, GPConfig, PoisonedStream
from training.baselines import Scorer, all_scorers
from training.config import FitConfig
from training.data import (
    FASHION_FILES,
    FASHION_SYSTEM_DIR,
    MNIST_FILES,
    LabeledImages,
    load_dataset,
    parse_idx,
    verify_idx_file,
)
from training.detection_metrics import DetectionMetrics, detection_metrics
from training.detector import FittedDetector
from training.downstream import ClassifierConfig, DownstreamResult, victim_result
from training.eval_report import Curves, render_markdown, save_plots


class Budget(BaseModel):
    """Training budgets of everything the evaluation trains besides the detector."""

    victim: ClassifierConfig
    gp: GPConfig
    collision: CollisionConfig

    @classmethod
    def full(cls) -> Budget:
        return cls(victim=ClassifierConfig(), gp=GPConfig(), collision=CollisionConfig())

    @classmethod
    def quick(cls) -> Budget:
        small = ClassifierConfig(hidden=64, steps=150)
        return cls(
            victim=ClassifierConfig(steps=400),
            gp=GPConfig(pretrain_steps=100, attack_steps=60, target=small),
            collision=CollisionConfig(steps=40, surrogate=small),
        )


class EvalConfig(BaseModel):
    datasets: list[str]
    attacks: list[str]
    rates: list[float]
    seed: int = 0
    quick: bool = False
    stream_size: int = 3000
    holdout_fraction: float = 1 / 3
    data_dir: Path | None = None
    ood_dir: Path | None = None
    detector_dir: Path | None = None
    device: str = "auto"
    victim_seeds: int = 1


class DetectionRow(BaseModel):
    dataset: str
    attack: str
    rate: float
    clean_label: bool
    detector: str
    role: str
    metrics: DetectionMetrics


class DownstreamRow(BaseModel):
    dataset: str
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
    stream: int
    holdout: int
    trusted: int
    calibration: int
    ood_donor: str
    unattacked_accuracy: float
    fit_seconds: float
    eval_seconds: float = 0.0


class GoalRow(BaseModel):
    """The issue's bar for one stream: fused TPR@1%FPR above every baseline, and the filtered
    victim within 1 accuracy point of the one trained on the stream minus its poisons."""

    dataset: str
    attack: str
    rate: float
    clean_label: bool
    fused_tpr: float
    best_baseline: str
    best_baseline_tpr: float
    beats_baselines: bool
    accuracy_gap: float
    accuracy_restored: bool


class EvalReport(BaseModel):
    config: EvalConfig
    datasets: list[DatasetSummary]
    detection: list[DetectionRow]
    downstream: list[DownstreamRow]

    def goals(self) -> list[GoalRow]:
        out = []
        for d in self.downstream:
            rows = [r for r in self.detection if (r.dataset, r.attack, r.rate) == (d.dataset, d.attack, d.rate)]
            fused = next(r for r in rows if r.role == "ours")
            best = max((r for r in rows if r.role == "baseline"), key=lambda r: r.metrics.tpr_at_fpr)
            gap = d.filtered.accuracy - d.clean.accuracy
            out.append(GoalRow(
                dataset=d.dataset, attack=d.attack, rate=d.rate, clean_label=d.clean_label,
                fused_tpr=fused.metrics.tpr_at_fpr, best_baseline=best.detector,
                best_baseline_tpr=best.metrics.tpr_at_fpr,
                beats_baselines=fused.metrics.tpr_at_fpr > best.metrics.tpr_at_fpr,
                accuracy_gap=gap, accuracy_restored=gap >= -0.01,
            ))
        return out


@dataclass(frozen=True)
class StreamSource:
    """Clean stream handed to the attacks; carries the class count so no attack has to guess it."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int


def split_test(test: LabeledImages, stream_size: int, holdout_fraction: float, seed: int) -> tuple[LabeledImages, LabeledImages]:
    """Seeded cut of the test split into (stream, held-out victim test set), disjoint."""
    order = np.random.default_rng(seed).permutation(len(test))
    n_hold = round(holdout_fraction * len(test))
    return test.subset(np.sort(order[n_hold : n_hold + stream_size])), test.subset(np.sort(order[:n_hold]))


def load_donor(dataset: str, ood_dir: Path | None) -> tuple[np.ndarray | None, str]:
    """Test images of a *different* data set for OOD injection, or (None, 'uniform noise').

    Fashion-MNIST streams get MNIST t10k (from ``ood_dir``); every other data set gets
    Fashion-MNIST t10k (from ``ood_dir`` or the Debian package's folder).
    """
    if dataset == "fashion-mnist":
        spec, folders, name = MNIST_FILES["test_images"], [ood_dir], "mnist t10k"
    else:
        spec, folders, name = FASHION_FILES["test_images"], [ood_dir, FASHION_SYSTEM_DIR], "fashion-mnist t10k"
    for folder in folders:
        if folder is not None and (folder / spec.name).is_file():
            raw = parse_idx(verify_idx_file(folder / spec.name, spec))
            return (raw.astype(np.float32) / 255.0)[:, None], name
    return None, "uniform noise"


def attack_params(name: str, budget: Budget, donor: np.ndarray | None) -> dict[str, object]:
    return {"gp": {"config": budget.gp}, "feature_collision": {"config": budget.collision},
            "ood_injection": {"donor": donor}}.get(name, {})


def fit_detector(cfg: EvalConfig, dataset: str, out: Path) -> FittedDetector:
    """Load ``--detector-dir`` or fit on the train split; a fitted one is saved under ``out`` so a
    later run can re-evaluate it (``--detector-dir``) without paying for training again."""
    if cfg.detector_dir is not None:
        return FittedDetector.load(cfg.detector_dir, device=cfg.device)
    from training.pipeline import fit

    make = FitConfig.quick if cfg.quick else FitConfig
    det = fit(make(dataset=dataset, seed=cfg.seed, data_dir=cfg.data_dir, device=cfg.device), progress=True)
    det.save(out / f"detector-{dataset}")
    return det


def score_stream(stream: PoisonedStream, scorers: list[Scorer]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(scores, flagged) of every detector on one stream."""
    out = {}
    for s in scorers:
        scores = np.asarray(s.score(stream.images, stream.labels), dtype=np.float64)
        out[s.name] = scores, np.asarray(s.flag(stream.images, stream.labels, scores), dtype=bool)
    return out


def evaluate_dataset(cfg: EvalConfig, dataset: str, budget: Budget, curves: Curves, out: Path) -> tuple[
    DatasetSummary, list[DetectionRow], list[DownstreamRow]
]:
    started = time.perf_counter()
    det = fit_detector(cfg, dataset, out)
    fit_seconds = time.perf_counter() - started
    splits = load_dataset(dataset, cfg.data_dir, download=False)
    k = splits.num_classes
    stream_clean, holdout = split_test(splits.test, cfg.stream_size, cfg.holdout_fraction, cfg.seed)
    source = StreamSource(stream_clean.images, stream_clean.labels, k)
    donor, donor_name = load_donor(dataset, cfg.ood_dir)
    scorers = all_scorers(det, k, cfg.seed, budget.victim)
    roles = {s.name: s.role for s in scorers}
    seeds = [cfg.seed + i for i in range(cfg.victim_seeds)]

    def victim(images: np.ndarray, labels: np.ndarray, target: int | None) -> DownstreamResult:
        return victim_result(images, labels, holdout, k, seeds, budget.victim, target)

    unattacked = victim(source.images, source.labels, None)

    detection, downstream = [], []
    plot_rate = max(cfg.rates)
    for name, rate in tqdm([(a, r) for a in cfg.attacks for r in cfg.rates], desc=f"evaluate {dataset}"):
        spec = ATTACKS[name]
        stream = spec.fn(source, rate, cfg.seed, **attack_params(name, budget, donor))
        results = score_stream(stream, scorers)
        for detector, (scores, flagged) in results.items():
            detection.append(DetectionRow(
                dataset=dataset, attack=name, rate=rate, clean_label=spec.clean_label, detector=detector,
                role=roles[detector], metrics=detection_metrics(stream.is_poison, scores, flagged, det.metadata.target_fpr),
            ))
        flagged, clean = results["depois-fused"][1], ~stream.is_poison
        target = stream.target_label if name == "backdoor" else None
        downstream.append(DownstreamRow(
            dataset=dataset, attack=name, rate=rate, clean_label=spec.clean_label,
            poisoned=victim(stream.images, stream.labels, target),
            filtered=victim(stream.images[~flagged], stream.labels[~flagged], target),
            clean=victim(stream.images[clean], stream.labels[clean], target),
            removed_poisons=int(np.sum(flagged & stream.is_poison)),
            removed_clean=int(np.sum(flagged & ~stream.is_poison)),
        ))
        if rate == plot_rate:
            curves.setdefault(dataset, {})[name] = (stream.is_poison, {d: s for d, (s, _) in results.items()})
    summary = DatasetSummary(
        name=dataset, stream=len(stream_clean), holdout=len(holdout), trusted=len(det.trusted),
        calibration=len(det.calibration), ood_donor=donor_name, unattacked_accuracy=unattacked.accuracy,
        fit_seconds=round(fit_seconds, 1),
        eval_seconds=round(time.perf_counter() - started - fit_seconds, 1),
    )
    return summary, detection, downstream


def run_evaluation(cfg: EvalConfig, out: Path) -> EvalReport:
    """Evaluate every data set and write ``evaluation.json``, ``evaluation.md`` and PNGs to ``out``."""
    budget = Budget.quick() if cfg.quick else Budget.full()
    curves: Curves = {}
    summaries, detection, downstream = [], [], []
    for dataset in cfg.datasets:
        summary, det_rows, down_rows = evaluate_dataset(cfg, dataset, budget, curves, out)
        summaries.append(summary)
        detection += det_rows
        downstream += down_rows
    report = EvalReport(config=cfg, datasets=summaries, detection=detection, downstream=downstream)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(
        {**report.model_dump(mode="json"), "goals": [g.model_dump() for g in report.goals()]}, indent=2))
    (out / "evaluation.md").write_text(render_markdown(report))
    save_plots(curves, out)
    return report


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str, known: dict[str, object], what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise typer.BadParameter(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def evaluate(
    dataset: Annotated[list[str] | None, typer.Option(
        "--dataset", "-d", help="Data set to evaluate; repeat for several (digits, fashion-mnist, mnist-5k) "
        "[default: digits].")] = None,
    attacks: Annotated[str, typer.Option(
        help="Comma-separated attacks: " + ", ".join(ATTACKS) + ".")] = ",".join(ATTACKS),
    rates: Annotated[str, typer.Option(help="Comma-separated poison rates (share of the stream).")] = "0.1,0.2,0.3",
    out: Annotated[Path, typer.Option(help="Folder for evaluation.json, evaluation.md and the PNGs.")] = Path("runs/evaluate"),
    seed: Annotated[int, typer.Option(help="Seed of the detector, the stream cut, the attacks and the victims.")] = 0,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Tiny training budgets and rate 0.2 only (unless --rates is given): a smoke run for tests.")] = False,
    stream_size: Annotated[int, typer.Option(help="Most test samples put into the attacked stream.")] = 3000,
    data_dir: Annotated[Path | None, typer.Option(help="Folder with the data set's IDX files.")] = None,
    ood_dir: Annotated[Path | None, typer.Option(
        help="Folder with the OOD donor's t10k IDX files (MNIST for fashion-mnist; Fashion-MNIST otherwise, "
             f"default {FASHION_SYSTEM_DIR}). Without one, OOD injection uses uniform noise.")] = None,
    detector_dir: Annotated[Path | None, typer.Option(
        help="Evaluate a detector saved by `depois-train fit --out` instead of fitting one (one data set only).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (detector training and scoring).")] = "auto",
    victim_seeds: Annotated[int, typer.Option(
        help="Victims trained per stream (seeds seed, seed+1, ...); accuracies are averaged.")] = 1,
) -> None:
    """Measure how well De-Pois catches poisons next to the usual baselines, and whether filtering
    gives the victim model back its clean accuracy.

    Streams are cut from the test split only; every boundary comes from the trusted pool's
    calibration part, so nothing is tuned on the data being scored.

    Precision, recall and F1 treat the POISON as the positive class (the released De-Pois code
    treats the clean class as positive, which flatters it).

    The markdown tables are printed and saved under --out with evaluation.json and PNGs (score
    histograms of clean vs poisoned samples and ROC curves, one panel per attack).
    """
    dataset = dataset or ["digits"]
    if detector_dir is not None and len(dataset) != 1:
        raise typer.BadParameter("--detector-dir evaluates one data set; pass exactly one --dataset")
    rate_list = _floats(rates)
    if quick and rates == "0.1,0.2,0.3":
        rate_list = [0.2]
    cfg = EvalConfig(
        datasets=dataset, attacks=_names(attacks, ATTACKS, "attack"), rates=rate_list, seed=seed, quick=quick,
        stream_size=stream_size, data_dir=data_dir, ood_dir=ood_dir, detector_dir=detector_dir, device=device,
        victim_seeds=victim_seeds,
    )
    report = run_evaluation(cfg, out)
    typer.echo(render_markdown(report))
    typer.echo(f"\nwrote {out / 'evaluation.json'}, {out / 'evaluation.md'} and PNGs to {out}", err=True)
