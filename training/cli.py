"""``depois-train``: train a De-Pois detector and export it as the ONNX model the stream filter loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from training.data import DATASETS, DatasetError

app = typer.Typer(
    name="depois-train",
    help=(
        "Train the De-Pois poisoning detector offline and export it to ONNX.\n\n"
        "Typical use: `depois-train all --dataset digits --out artifacts/digits` trains on the "
        "trusted part of the train split, calibrates the boundary on a held-out slice of it, and "
        "writes model.onnx + model.card.json for `depois-stream`. `fit` and `export-onnx` run the "
        "two halves separately; `datasets` lists what can be trained on."
    ),
    no_args_is_help=True,
    add_completion=False,
)
console = Console()

DatasetOpt = Annotated[str, typer.Option("--dataset", help=f"Data set: {', '.join(DATASETS)}.")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(help="Folder with the IDX .gz files (mnist, mnist-5k test, fashion-mnist)."),
]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never download; a missing file is an error.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of every random choice; CPU runs are reproducible.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder (detector/, PNGs, model.onnx).")]
ScoreOpt = Annotated[
    str, typer.Option("--score", help="fused (critic + authenticator label consistency) or critic (paper).")
]
FprOpt = Annotated[float, typer.Option(help="Clean false-positive rate the boundary is set to.")]
PerClassOpt = Annotated[
    bool, typer.Option("--per-class/--global", help="One threshold per class, or one for all.")
]
TrustedOpt = Annotated[float, typer.Option(help="Share of the train split the defender trusts.")]
CalOpt = Annotated[float, typer.Option(help="Share of the trusted pool held out for calibration.")]
AuthStepsOpt = Annotated[int | None, typer.Option(help="Authenticator steps (default: per data set, training/config.py).")]
GanStepsOpt = Annotated[int | None, typer.Option(help="cGAN steps (default: per data set).")]
CriticStepsOpt = Annotated[
    int | None, typer.Option(help="WGAN-GP generator steps, 5 critic steps each (default: per data set).")
]
ThreadsOpt = Annotated[
    int, typer.Option(help="torch CPU threads; 1 is robust on a shared box, 0 = torch's default.")
]
BatchOpt = Annotated[int, typer.Option(help="Minibatch size of all stages.")]
ThresholdOpt = Annotated[float, typer.Option(help="Keep a synthetic sample iff p_auth(label|x) >= this.")]
QuantizeOpt = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        help="int8: also write MODEL.int8.onnx (+ card), dynamic int8 quantisation of the linear "
        "layers, only if its verdicts agree with fp32 on >= 99.5 % of the calibration split (the "
        "agreement is printed; below it nothing is written and the exit code is 1).",
    ),
]
SynthOpt = Annotated[
    int | None, typer.Option(help="Synthetic samples to keep (default: train size - trusted size).")
]


def _config(**kwargs: object):
    from pydantic import ValidationError

    from training.config import FitConfig

    kwargs["download"] = not kwargs.pop("offline")
    kwargs["score_kind"] = kwargs.pop("score")
    try:
        return FitConfig(**kwargs)
    except ValidationError as exc:
        console.print(f"[red]invalid option:[/red] {exc}")
        raise typer.Exit(2) from exc


def _fit_and_save(cfg, out: Path):
    from training.pipeline import fit
    from training.plots import plot_losses, plot_sample_grid

    try:
        det = fit(cfg, progress=True)
    except DatasetError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    det.save(out / "detector")
    plot_losses(det.report["losses"], out / "losses.png")
    plot_sample_grid(det.synthetic_preview, det.metadata.num_classes, out / "synthetic_grid.png")
    return det


def _export(det, model: Path, quantize: str | None = None) -> None:
    from training.export import ExportParityError, export_onnx

    if quantize not in (None, "int8"):
        console.print(f"[red]--quantize {quantize!r} is not supported;[/red] use --quantize int8")
        raise typer.Exit(2)
    try:
        card = export_onnx(det, model)
    except ExportParityError as exc:
        console.print(f"[red]export refused:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"wrote {model} (sha256 {card.onnx_sha256[:16]}...) and its model card")
    if quantize == "int8":
        _quantize(det, model)


def _quantize(det, model: Path) -> None:
    from training.quantize import QuantizationRefused, int8_path_for, quantize_detector

    try:
        report = quantize_detector(det, model)
    except QuantizationRefused as exc:
        console.print(f"[red]int8 model refused:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"wrote {int8_path_for(model)}: {report.summary()}")


def _summary(det, out: Path) -> None:
    r, meta = det.report, det.metadata
    table = Table(title=f"depois-train: {meta.dataset} ({meta.model_version})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in r["sizes"].items():
        table.add_row(key.replace("_", " "), f"{value:,}")
    table.add_row("authenticator acceptance rate", f"{r['acceptance_rate']:.1%}")
    table.add_row("authenticator accuracy (calibration)", f"{r['authenticator_calibration_accuracy']:.1%}")
    table.add_row("score kind", meta.score_kind)
    table.add_row("target / achieved calibration FPR", f"{meta.target_fpr:.2%} / {r['calibration_fpr']:.2%}")
    table.add_row("global boundary", f"{meta.boundary.global_:.3f}")
    if meta.boundary.per_class is not None:
        table.add_row("classes using the global fallback", str(len(r["per_class_fallback"])))
    for stage, seconds in r["times_s"].items():
        table.add_row(f"time {stage}", f"{seconds:.1f} s")
    table.add_row("output", str(out))
    console.print(table)


@app.command()
def datasets() -> None:
    """List the registered data sets, their image shape and where their files come from."""
    table = Table(title="data sets")
    for col in ("name", "shape (C,H,W)", "source"):
        table.add_column(col)
    for name, info in DATASETS.items():
        table.add_row(name, ",".join(map(str, info.shape)), info.description)
    console.print(table)


@app.command()
def fit(
    dataset: DatasetOpt = "digits",
    data_dir: DataDirOpt = None,
    offline: OfflineOpt = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 1,
    seed: SeedOpt = 0,
    out: OutOpt = Path("artifacts/model"),
    score: ScoreOpt = "fused",
    target_fpr: FprOpt = 0.01,
    per_class: PerClassOpt = True,
    trusted_fraction: TrustedOpt = 0.2,
    calibration_fraction: CalOpt = 0.2,
    auth_steps: AuthStepsOpt = None,
    gan_steps: GanStepsOpt = None,
    critic_steps: CriticStepsOpt = None,
    batch_size: BatchOpt = 64,
    auth_threshold: ThresholdOpt = 0.9,
    n_synthetic: SynthOpt = None,
) -> None:
    """Train the detector and save it to OUT/detector (plus losses.png and synthetic_grid.png).

    Reads only the train split. Export it afterwards with `depois-train export-onnx --out OUT`."""
    cfg = _config(**{k: v for k, v in locals().items() if k != "out"}, out_dir=out)
    det = _fit_and_save(cfg, out)
    _summary(det, out)


@app.command("export-onnx")
def export_onnx_cmd(
    out: OutOpt = Path("artifacts/model"),
    model: Annotated[
        Path | None, typer.Option(help="ONNX file to write (default: OUT/model.onnx).")
    ] = None,
    quantize: QuantizeOpt = None,
) -> None:
    """Export OUT/detector to one ONNX file and its model card.

    The graph is checked against the torch detector on the calibration split first (max |score
    difference| <= 1e-4 and identical verdicts); a model that fails is not written (exit code 1)."""
    from training.detector import FittedDetector

    det = FittedDetector.load(out / "detector")
    _export(det, model or out / "model.onnx", quantize)


@app.command("all")
def all_cmd(
    dataset: DatasetOpt = "digits",
    data_dir: DataDirOpt = None,
    offline: OfflineOpt = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 1,
    seed: SeedOpt = 0,
    out: OutOpt = Path("artifacts/model"),
    score: ScoreOpt = "fused",
    target_fpr: FprOpt = 0.01,
    per_class: PerClassOpt = True,
    trusted_fraction: TrustedOpt = 0.2,
    calibration_fraction: CalOpt = 0.2,
    auth_steps: AuthStepsOpt = None,
    gan_steps: GanStepsOpt = None,
    critic_steps: CriticStepsOpt = None,
    batch_size: BatchOpt = 64,
    auth_threshold: ThresholdOpt = 0.9,
    n_synthetic: SynthOpt = None,
    quantize: QuantizeOpt = None,
) -> None:
    """Fit, then export: OUT/detector, OUT/model.onnx, OUT/model.card.json and the PNGs."""
    cfg = _config(**{k: v for k, v in locals().items() if k not in ("out", "quantize")}, out_dir=out)
    det = _fit_and_save(cfg, out)
    _export(det, out / "model.onnx", quantize)
    _summary(det, out)


from training.evaluate import evaluate  # noqa: E402  (torch-heavy; registered last on purpose)

app.command("evaluate")(evaluate)
