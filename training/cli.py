"""``depois-train``: train the union detector and export it as the ONNX model the stream filter loads.

Every expected failure is one line on stderr and a documented exit code (``EXIT_CODES``), and
every flag is checked before any long work starts: a typo in ``--quantize`` must not cost ten
minutes of training first.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Optional, get_args, get_origin

import typer
from rich.console import Console
from rich.table import Table

from depois_stream.contract.model import first_line
from training.conformal import fpr_standard_error
from training.data import DATASETS, DatasetError

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_DATA = 0, 1, 2, 3
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_REFUSED: "the model was refused: the ONNX/torch parity check (nothing was written), or the int8 "
                  "verdict gate of --quantize (the fp32 model, card and signature were written, the int8 "
                  "copy was not)",
    EXIT_USAGE: "invalid command line: an option value out of range or unknown (data set, members, "
                "--quantize, --device cuda without CUDA), --out / --detector-dir without a trained detector, "
                "an output that cannot be written, an export without --sign-key over a signed model, "
                "--dataset/--data-dir/--trusted-fraction beside --trusted-npz, --data-dir with digits",
    EXIT_DATA: "data problem: data set files missing, corrupt or not downloadable, a --trusted-npz file that "
               "is unreadable or breaks its rules, a saved detector that cannot be read back, or a "
               "recalibrate --clean file that is unreadable, does not fit the model, holds too few samples or "
               "is flagged by the current model beyond --max-flagged",
}
EXIT_CODES_TEXT = "Exit codes: " + "; ".join(f"{code} = {text}" for code, text in EXIT_CODES.items()) + "."

app = typer.Typer(
    name="depois-train",
    help=(
        "Train the De-Pois union poisoning detector offline and export it to ONNX.\n\n"
        "Typical use: `depois-train all --dataset digits --out runs/digits` trains on the "
        "trusted part of the train split, calibrates the boundary on out-of-sample scores of it, and "
        "writes model.onnx + model.card.json for `depois-stream`. `fit` and `export-onnx` run the "
        "two halves separately; `recalibrate` moves the boundary onto clean samples of the stream; "
        "`evaluate` measures it against baselines; `datasets` lists what can be trained on.\n\n"
        + EXIT_CODES_TEXT
    ),
    no_args_is_help=True,
    add_completion=False,
    # click's plain formatter re-wraps every paragraph to the terminal, as depois-stream's does;
    # typer's rich mode keeps the docstrings' source line breaks (ragged at 80 columns).
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)


def fail(code: int, message: str) -> NoReturn:
    """One line on stderr, then exit with a documented code (never a traceback)."""
    err_console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False, markup=True)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- options from FitConfig

CLI_DEFAULTS: dict[str, object] = {"out_dir": Path("artifacts/model")}


def _flag(name: str, field: Any) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return str(extra.get("cli", "--" + name.replace("_", "-")))


def _cli_type(annotation: Any) -> Any:
    """The type typer parses for a FitConfig field: tuples become one comma-separated string."""
    if get_origin(annotation) is tuple:
        return str
    if get_origin(annotation) is Literal:
        return annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    if args and len(args) < len(get_args(annotation)):  # X | None
        return Optional[args[0]]
    return annotation


def config_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per FitConfig field, with its flag, type, default and help."""
    from training.config import FitConfig

    params = []
    for name, field in FitConfig.model_fields.items():
        default = CLI_DEFAULTS.get(name, field.default)
        if isinstance(default, tuple):
            default = ",".join(default)
        option = typer.Option(_flag(name, field), help=field.description or "")
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[_cli_type(field.annotation), option]))
    return params


def build_config(values: dict[str, object]):
    """FitConfig from parsed options, or exit 2 naming each offending flag on its own line."""
    from pydantic import ValidationError

    from training.config import FitConfig

    try:
        return FitConfig(**values)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:  # a check across options: its message names them
                lines.append(message)
                continue
            name = str(err["loc"][0])
            field = FitConfig.model_fields.get(name)
            flag = _flag(name, field) if field else name
            lines.append(f"invalid {flag.split('/')[0]} {err.get('input')!r}: {message}")
        fail(EXIT_USAGE, "; ".join(lines))


def writable_folder(path: Path, what: str) -> None:
    """Create ``path`` (and parents) now, or exit 2: better than failing after training."""
    if path.exists() and not path.is_dir():
        fail(EXIT_USAGE, f"{what} {path} exists and is not a folder; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".depois-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        fail(EXIT_USAGE, f"cannot write to {what} {path} ({exc.strerror or exc}); pass a writable folder")


def preflight(cfg) -> None:
    """Everything that can be checked in seconds: device, data files, output folder, the plan."""
    import numpy as np

    from training.crossfit import make_plan
    from training.data import fit_data
    from training.torchutil import resolve_device

    try:
        resolve_device(cfg.device)
    except RuntimeError as exc:
        fail(EXIT_USAGE, str(exc))
    if cfg.data_dir is not None and not cfg.data_dir.is_dir():
        fail(EXIT_USAGE, f"--data-dir {cfg.data_dir} is not a folder; pass the folder that holds the IDX files")
    if cfg.data_dir is not None and cfg.dataset == "digits":
        fail(EXIT_USAGE, "--data-dir does not apply to digits (bundled with scikit-learn); for your own "
                         "images use --trusted-npz")
    try:
        splits, parts = fit_data(cfg)
    except DatasetError as exc:
        fail(EXIT_DATA, str(exc))
    pool_size = len(parts.trusted_train) + len(parts.calibration)
    from training.data import LabeledImages

    pool = LabeledImages(np.concatenate([parts.calibration.images, parts.trusted_train.images]),
                         np.concatenate([parts.calibration.labels, parts.trusted_train.labels]))
    try:
        plan = make_plan(pool, parts.calibration, parts.trusted_train, cfg.calibration_fraction, cfg.target_fpr,
                         cfg.folds, cfg.seed)
        smallest = plan.min_class_count(splits.num_classes)
    except ValueError as exc:
        more = "add samples to --trusted-npz" if cfg.trusted_npz is not None else "raise --trusted-fraction"
        fail(EXIT_USAGE, f"{exc} (trusted pool of {pool_size}); {more} or lower --folds")
    if plan.mode == "crossfit" and cfg.n_synthetic == 0:
        fail(EXIT_USAGE, "--n-synthetic 0 leaves the mimic model without training data under cross-fitting (every "
                         "trusted image calibrates); pass --n-synthetic > 0 or --folds 1")
    if smallest < 1:
        # Cross-fitting trains each fold on (folds - 1) / folds of the pool, so more folds (not
        # fewer) leave a rare class a sample to train on; the split plan trains on what
        # calibration leaves over.
        counts = np.bincount(pool.labels, minlength=splits.num_classes)
        rarest = int(counts.min())
        if cfg.trusted_npz is not None:
            # the pool is the user's file: --trusted-fraction does not apply to it, and a class too
            # rare to reach every fold's training part is a data problem whatever --folds says
            from training.pipeline import RARE_CLASS_SAMPLES

            fail(EXIT_DATA, f"{cfg.trusted_npz}: class {int(counts.argmin())} has {rarest} sample"
                            f"{'s' * (rarest != 1)}, too few to train and calibrate on; add samples of it "
                            f"(>= {RARE_CLASS_SAMPLES} per class keep its false alarms near the target)")
        if plan.mode != "crossfit":
            remedy = "raise --trusted-fraction or lower --calibration-fraction"
        elif rarest < 2:  # its one sample calibrates some fold, whatever --folds is
            remedy = f"raise --trusted-fraction (a class has {rarest} trusted sample{'s' * (rarest != 1)})"
        else:
            remedy = "raise --trusted-fraction or --folds (each fold trains on (folds - 1) / folds of the pool)"
        fail(EXIT_USAGE, f"a class has no trusted training sample in the {plan.mode} plan over {pool_size} trusted "
                         f"samples; {remedy}")
    if cfg.out_dir is not None:
        writable_folder(cfg.out_dir, "--out")


def _fit_warning_once(cfg):
    """``fit(cfg, progress=True)``, its calibration warning shown once: ``_summary`` prints the
    plan's warning as ``warning: ...`` after the table, so the Python warning of the same text
    (printed first, with the source line ``det = fit(...)``) is held back. Every other warning is
    shown as Python shows it, after the fit (or its failure)."""
    import warnings

    from training.pipeline import CalibrationWarning, fit

    det, caught = None, []
    try:
        with warnings.catch_warnings(record=True) as caught:
            det = fit(cfg, progress=True)
    finally:
        summarised = det.report.get("plan", {}).get("warning") if det is not None else None
        for w in caught:
            if not (issubclass(w.category, CalibrationWarning) and str(w.message) == summarised):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    return det


def _fit_and_save(cfg, out: Path):
    from training.plots import plot_losses, plot_sample_grid

    try:
        det = _fit_warning_once(cfg)
    except DatasetError as exc:
        fail(EXIT_DATA, str(exc))
    det.save(out / "detector")
    plot_losses(det.report["losses"], out / "losses.png")
    plot_sample_grid(det.synthetic_preview, det.metadata.num_classes, out / "synthetic_grid.png")
    return det


def _export(det, model: Path, quantize: str | None = None, sign_key: Path | None = None) -> None:
    """Write the model, its card, its int8 copy and their signatures, all or nothing.

    Every file is built and signed in a staging folder beside ``model`` (same file system, same
    folder name, which the signature covers); only when everything succeeded are they renamed
    into place, each model's card and signature before the model itself. A filter hot-reloading
    from that folder reacts only to a new model file, so it never sees a new model beside the old
    card or signature (before stop 43 the model landed first: a reload in that second was
    rejected as a forged signature, and a failed signing left the new model beside the old .sig).
    """
    import tempfile

    from training.export import ExportParityError, export_onnx

    model.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model.parent, prefix=".depois-export-") as tmp:
        stage = Path(tmp) / (model.parent.resolve().name or "model")
        stage.mkdir()
        staged = stage / model.name
        try:
            card = export_onnx(det, staged)
        except ExportParityError as exc:
            fail(EXIT_REFUSED, f"export refused: {exc}")
        written, lines = [staged], [f"wrote {model} (sha256 {card.onnx_sha256[:16]}...) and its model card"]
        refused = None  # the int8 gate's refusal: the fp32 model is still published, then exit 1
        if quantize == "int8":
            from training.quantize import QuantizationRefused, int8_path_for, quantize_detector

            try:
                report = quantize_detector(det, staged)
                written.append(int8_path_for(staged))
                lines.append(f"wrote {int8_path_for(model)}: {report.summary()}")
            except QuantizationRefused as exc:
                refused = exc
        if sign_key is not None:
            for path in written:
                sig = _sign(path, sign_key)
                lines.append(f"signed {path.name} and its card: {model.parent / sig.name}")
        for path in written:
            _publish(path, model.parent)
    for line in lines:
        console.print(line)
    if refused is not None:
        fail(EXIT_REFUSED, f"int8 model refused (only {model.name} was written): {refused}")


def _publish(staged: Path, folder: Path) -> None:
    """Rename a staged model's card and signature, then the model, into ``folder`` (atomic each)."""
    from depois_stream.contract import card_path_for
    from depois_stream.contract.signing import signature_path_for

    for path in (card_path_for(staged), signature_path_for(staged), staged):
        if path.exists():
            os.replace(path, folder / path.name)


SIGN_PASSWORD_ENV = "DEPOIS_SIGN_KEY_PASSWORD"


def _check_sign_key(sign_key: Path | None, model: Path, quantize: str | None = None) -> None:
    """Refuse a missing, unreadable or unusable signing key before any long work, and an export
    without one over a signed model (``_refuse_stale_signature``)."""
    if sign_key is None:
        _refuse_stale_signature(model, quantize)
        return
    from depois_stream.contract.signing import SignatureError, check_private_key

    try:
        check_private_key(sign_key, os.environ.get(SIGN_PASSWORD_ENV))
    except SignatureError as exc:
        fail(EXIT_USAGE, f"--sign-key: {exc}")


def _refuse_stale_signature(model: Path, quantize: str | None) -> None:
    """Exit 2 when a model this export writes has a signature beside it and no --sign-key was
    given. The new model and card would sit next to the old model's .sig: a filter that verifies
    signatures rejects the reload and refuses to restart (exit 2), and nothing said so."""
    from depois_stream.contract.signing import signature_path_for

    written = [model]
    if quantize == "int8":
        from training.quantize import int8_path_for

        written.append(int8_path_for(model))
    for path in written:
        sig = signature_path_for(path)
        if sig.exists():
            fail(EXIT_USAGE, f"{path} has a signature beside it ({sig}) and no --sign-key was given: the new model "
                             "would sit next to the old signature, which a verifying filter rejects (no reload, "
                             f"no restart); pass --sign-key to sign the new model, or remove {sig} to publish it "
                             "unsigned")


def _sign(model: Path, sign_key: Path) -> Path:
    from depois_stream.contract.signing import SignatureError, sign_model

    try:
        return sign_model(model, sign_key, password=os.environ.get(SIGN_PASSWORD_ENV))
    except SignatureError as exc:
        fail(EXIT_REFUSED, f"signing {model.name} failed, nothing was published: {exc}")


def _summary(det, out: Path) -> None:
    r, meta = det.report, det.metadata
    table = Table(title=f"depois-train: {meta.dataset} ({meta.model_version})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in r["sizes"].items():
        table.add_row(key.replace("_", " "), f"{value:,}")
    plan = r.get("plan", {})
    table.add_row("calibration plan", f"{plan.get('mode')} ({plan.get('folds')} fold(s))")
    table.add_row("evidence columns (weight)", ", ".join(
        f"{m} ({w:.2g})" for m, w in zip(meta.evidence_members, meta.member_weights())))
    if r.get("pixel_knn_gate"):
        table.add_row("pixel_knn gate", str(r["pixel_knn_gate"]))
    if r.get("mlp_margin"):
        table.add_row("mlp_margin", str(r["mlp_margin"]))
    table.add_row("authenticator acceptance rate", f"{r['acceptance_rate']:.1%}")
    table.add_row("authenticator accuracy (out of fold)", f"{r['authenticator_out_of_fold_accuracy']:.1%}")
    if r.get("mlp_out_of_fold_accuracy") is not None:
        table.add_row("mlp_margin's MLP accuracy (out of fold)", f"{r['mlp_out_of_fold_accuracy']:.1%}")
    cv = r.get("cv_fpr") or []
    cv_text = f"{sum(cv) / len(cv):.2%} (folds {min(cv):.2%} to {max(cv):.2%})" if cv else "n/a"
    table.add_row("target FPR / out-of-sample FPR", f"{meta.target_fpr:.2%} / {cv_text}")
    # what one fit's realised FPR scatters by at least: its out-of-sample estimate is read off the
    # same few calibration samples, so it does not predict where this fit lands, and small
    # cross-fitted pools scatter more (the calibration warning says so)
    table.add_row("FPR scatter, new data (binomial sd)",
                  f"+-{fpr_standard_error(meta.target_fpr, det.union.n):.2%}")
    table.add_row("global boundary (log weighted min-p)", f"{meta.boundary.global_:.3f}")
    if meta.boundary.per_class is not None:
        table.add_row("classes using the global fallback", str(len(r["per_class_fallback"])))
    for stage, seconds in r["times_s"].items():
        table.add_row(f"time {stage}", f"{seconds:.1f} s")
    table.add_row("output", str(out))
    console.print(table)
    if plan.get("warning"):
        err_console.print(f"[yellow]warning:[/yellow] {plan['warning']}", soft_wrap=True)


@app.command()
def datasets() -> None:
    """List the registered data sets, their image shape and where their files come from (your own
    trusted pool: `fit --trusted-npz`)."""
    table = Table(title="data sets")
    for col in ("name", "shape (C,H,W)", "source"):
        table.add_column(col)
    for name, info in DATASETS.items():
        table.add_row(name, ",".join(map(str, info.shape)), info.description)
    table.add_row("(your own)", "any (>= 4 x 4)", "fit/all --trusted-npz POOL.npz: images and labels you trust (fit --help)")
    console.print(table)


def _sign_key_help(checked: str) -> str:
    """--sign-key's help; ``checked`` says when the key is checked (``all`` trains first, ``export-onnx`` does not)."""
    return ("PEM elliptic-curve private key (P-256/384/521): sign the exported model and its card "
            "(OpenSSF model-signing format, MODEL.sig next to it; the int8 copy too). Consumers started "
            "with `depois-stream run --verify-signature KEY.pub` refuse anything else. An encrypted "
            f"key's password is read from ${SIGN_PASSWORD_ENV}. Checked {checked}. Without it, an export "
            "over a model that has a MODEL.sig beside it is refused (exit 2): the old signature would not "
            "match the new model.")


SignKeyOpt = Annotated[Optional[Path], typer.Option("--sign-key", help=_sign_key_help("before any training"))]
ExportSignKeyOpt = Annotated[Optional[Path], typer.Option(
    "--sign-key", help=_sign_key_help("before the export starts"))]

QuantizeOpt = Annotated[
    Optional[Literal["int8"]],
    typer.Option(
        "--quantize",
        help="int8: also write MODEL.int8.onnx (+ card), dynamic int8 quantisation of the linear "
        "layers, only if its verdicts agree with fp32 on >= 99.5 % of the calibration samples (the "
        "agreement is printed; below it the int8 copy is not written, the fp32 model still is, and the exit "
        "code is 1).",
    ),
]


def _refuse_registry_flags_beside_own_pool(ctx: typer.Context, values: dict[str, object]) -> None:
    """Exit 2 when --trusted-npz comes with a flag that picks a registered pool, whatever its
    value: FitConfig sees only values, so `--dataset digits` (the default) passed it and was
    ignored without a word."""
    from training.config import REGISTRY_FIELDS, own_pool_clash

    if values.get("trusted_npz") is None:
        return
    defaulted = ("DEFAULT", "DEFAULT_MAP")
    problem = own_pool_clash(name for name in REGISTRY_FIELDS
                             if getattr(ctx.get_parameter_source(name), "name", None) not in defaulted)
    if problem:
        fail(EXIT_USAGE, problem)


def _command(doc: str, extra: list[inspect.Parameter], body) -> Any:
    """A typer command whose options are FitConfig's fields (+ ``extra``), dispatching to ``body``."""

    def command(ctx: typer.Context, **values: object) -> None:
        extras = {p.name: values.pop(p.name) for p in extra}
        _refuse_registry_flags_beside_own_pool(ctx, values)
        cfg = build_config(values)
        preflight(cfg)
        body(cfg, **extras)

    command.__doc__ = doc
    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    command.__signature__ = inspect.Signature([context] + config_parameters() + extra)  # type: ignore[attr-defined]
    return command


def _fit_body(cfg) -> None:
    det = _fit_and_save(cfg, cfg.out_dir)
    _summary(det, cfg.out_dir)


def _all_body(cfg, quantize: str | None, sign_key: Path | None) -> None:
    _check_sign_key(sign_key, cfg.out_dir / "model.onnx", quantize)
    det = _fit_and_save(cfg, cfg.out_dir)
    _export(det, cfg.out_dir / "model.onnx", quantize, sign_key)
    _summary(det, cfg.out_dir)


app.command("fit")(_command(
    "Train the detector and save it to OUT/detector (plus losses.png and synthetic_grid.png).\n\n"
    "Reads only the train split of --dataset, or all of --trusted-npz as the trusted pool. Export it afterwards with `depois-train export-onnx --out OUT`.",
    [], _fit_body))
app.command("all")(_command(
    "Fit, then export: OUT/detector, OUT/model.onnx, OUT/model.card.json and the PNGs.",
    [inspect.Parameter("quantize", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=QuantizeOpt),
     inspect.Parameter("sign_key", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=SignKeyOpt)],
    _all_body))


@app.command("export-onnx")
def export_onnx_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder that `fit --out` wrote (holds detector/).")] = Path(
        "artifacts/model"),
    model: Annotated[
        Optional[Path], typer.Option(help="ONNX file to write (default: OUT/model.onnx).")
    ] = None,
    quantize: QuantizeOpt = None,
    sign_key: ExportSignKeyOpt = None,
) -> None:
    """Export OUT/detector to one ONNX file and its model card (and sign them with --sign-key).

    The graph is checked against the torch detector on the calibration samples first (scores,
    p-values, evidence and verdicts); a model that fails is not written (exit code 1)."""
    _require_detector(out)
    target = model or out / "model.onnx"
    writable_folder(target.parent, "the model's folder")
    _replaceable_file(target)
    _check_sign_key(sign_key, target, quantize)
    _export(_load_detector(out), target, quantize, sign_key)


def _replaceable_file(target: Path) -> None:
    """Exit 2 unless ``target`` and its card are absent or regular files: the export replaces
    them by rename, which would put a model in the place of a folder, a FIFO or a device
    (`--model /dev/null` once replaced the device with a file)."""
    from depois_stream.contract import card_path_for

    for path in (target, card_path_for(target)):
        if path.exists() and not path.is_file():
            fail(EXIT_USAGE, f"{path} exists and is not a regular file; pass a new file path for --model")


def _require_detector(out: Path) -> None:
    """Exit 2 unless ``out`` holds what `fit --out` writes (cheap: before any other check)."""
    from training.detector import STATE_FILE, WEIGHTS_FILE

    folder = out / "detector"
    if not (folder / STATE_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        fail(EXIT_USAGE, f"no trained detector in {folder} (needs {STATE_FILE} and {WEIGHTS_FILE}); train one with "
                         f"`depois-train fit --out {out}` or pass the --out folder `fit` wrote")


def _load_detector(out: Path):
    from training.detector import FittedDetector

    folder = out / "detector"
    try:
        return FittedDetector.load(folder)
    except Exception as exc:  # noqa: BLE001 - any corrupt file (json, pickle, shapes) ends here as one line
        first = first_line(exc) or type(exc).__name__
        fail(EXIT_DATA, f"cannot read the detector in {folder} ({type(exc).__name__}: {first}); re-run "
                        f"`depois-train fit --out {out}`")


@app.command("recalibrate")
def recalibrate_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder that `fit --out` or `all --out` wrote (holds detector/).")] = Path(
        "artifacts/model"),
    clean: Annotated[Path, typer.Option(
        "--clean", help="An .npz of clean samples like the stream's, as `depois-stream replay export` writes "
                        "samples.npz: 'images' [N, C, H, W] (or [N, H, W] for one channel), uint8 0..255 "
                        "(divided by 255) or float in [0, 1], as the filter reads them, and 'labels' int [N]. "
                        "Exact repeats are dropped. At least 1 / target FPR unique samples; about 1,600 keep "
                        "the realised FPR within a quarter of a 1 % target.")] = Path("samples.npz"),
    into: Annotated[Optional[Path], typer.Option(
        "--into", help="Folder for the recalibrated detector (default: OUT-recalibrated); export it with "
                       "`depois-train export-onnx --out INTO --model <served model.onnx>`. Never OUT itself: "
                       "the original stays.")] = None,
    target_fpr: Annotated[Optional[float], typer.Option(
        "--target-fpr", min=1e-6, max=0.5, help="Clean false-positive rate to calibrate for (default: the "
                                                "detector's).")] = None,
    per_class: Annotated[Optional[bool], typer.Option(
        "--per-class/--global", help="One boundary per class where a class has >= 1 / target FPR samples, or "
                                     "one for all (default: as the detector was fitted).")] = None,
    max_flagged: Annotated[Optional[float], typer.Option(
        "--max-flagged", min=0.0, max=1.0, help="Refuse (exit 3) when the current model flags more than this "
        "share of the given samples (default: 5 x its target FPR, at least 0.05, or 5 x its card's out-of-sample "
        "FPR where that is higher, up to 0.25; no limit from a 20 % target up): such a file is probably not clean, and "
        "recalibrating on it would let its kind of sample through from then on. The refusal names the value "
        "that accepts a file you vetted.")] = None,
) -> None:
    """Recalibrate a trained detector on clean samples of the stream it will serve.

    `fit` reads the boundary off the trusted pool; a stream easier or harder than the pool moves the
    false-positive rate (and with it the catch rate: on MNIST with 1,000 trusted images the clean
    test stream was flagged at 0.3 to 0.5 % for a 1 % target and half the label flips got through;
    recalibrated on 1,000 clean test images it flagged 1.5 % of the clean stream and caught 83 to
    99.5 % of the flips: docs/evaluation.md). The networks stay; the p-value
    references, standardisation and boundary are re-read from their scores of these samples. The
    result is a new model version: `depois-train export-onnx --out INTO --model <served model.onnx>`
    writes it over the served file, atomically, and the filter's hot reload takes it.

    The samples must be clean and like the stream: a vetted sample of the ingest topic
    (`depois-stream replay export --topic <ingest topic>`). Not the clean topic alone: it lacks the
    clean samples the current boundary quarantined."""
    from rich.markup import escape

    from training.recalibrate import CleanDataError, load_clean, recalibrate

    _require_detector(out)
    resolved = out.resolve()
    into = into or resolved.with_name(f"{resolved.name or 'model'}-recalibrated")
    if into.resolve() == resolved:
        fail(EXIT_USAGE, "--into must differ from --out: the original detector stays as it is")
    if (into / "detector").exists():
        fail(EXIT_USAGE, f"{into / 'detector'} exists already; pass another --into (or remove it first)")
    if into.exists() and not into.is_dir():
        fail(EXIT_USAGE, f"--into {into} exists and is not a folder; pass a folder path")
    det = _load_detector(out)
    meta = det.metadata
    try:
        data = load_clean(clean, tuple(meta.input_shape), meta.num_classes)
        result = recalibrate(det, data, target_fpr if target_fpr is not None else meta.target_fpr,
                             per_class if per_class is not None else meta.boundary.per_class is not None,
                             max_flagged)
    except CleanDataError as exc:
        fail(EXIT_DATA, f"--clean: {exc}")
    from depois_stream.contract import sha256_file

    det.report["calibration"].update(clean_file=clean.name, clean_sha256=sha256_file(clean))  # for the card
    writable_folder(into, "--into")
    det.save(into / "detector")
    table = Table(title=f"depois-train recalibrate: {meta.dataset}")
    table.add_column("quantity")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("clean samples (unique)", "", f"{result.samples:,}")
    table.add_row("exact repeats dropped", "", f"{result.repeats_dropped:,}")
    table.add_row("share of them flagged", f"{result.flagged_before:.2%}", f"{result.flagged_after:.2%}")
    table.add_row("refused above (--max-flagged)", f"{result.max_flagged:.2%}", "")
    table.add_row("out-of-sample FPR (10 folds of them)", "",
                  f"{result.out_of_sample_fpr:.2%}" if result.out_of_sample_fpr is not None else "n/a")
    table.add_row("target FPR", f"{meta.target_fpr:.2%}", f"{result.target_fpr:.2%}")
    table.add_row("global boundary (log weighted min-p)", f"{result.boundary_before:.3f}", f"{result.boundary_after:.3f}")
    table.add_row("model version", result.version_before, result.version_after)
    console.print(table)
    if result.repeats_dropped:
        console.print(f"dropped {result.repeats_dropped:,} exact repeats of an (image, label) pair from {clean}; "
                      f"recalibrated on the {result.samples:,} unique samples", soft_wrap=True, highlight=False,
                      markup=False)
    # as README, docs/method.md and --help say: written over the served file, the filter's hot
    # reload takes it (a new folder's model.onnx is never reloaded)
    console.print(f"wrote {into / 'detector'}; next: depois-train export-onnx --out {into} --model <served "
                  "model.onnx> (add --sign-key KEY where the filter verifies signatures)", soft_wrap=True,
                  highlight=False, markup=False)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True, highlight=False)


from training.evaluate import evaluate  # noqa: E402  (torch-heavy; registered last on purpose)

app.command("evaluate")(evaluate)


@app.command("evaluate-merge")
def evaluate_merge(
    runs: Annotated[list[Path], typer.Argument(help="Folders written by `evaluate --out` (each holds evaluation.json).")],
    out: Annotated[Path, typer.Option(help="Folder for the merged evaluation.json and evaluation.md.")] = Path(
        "runs/evaluate-merged"),
) -> None:
    """Merge evaluations of different seeds into one report: means and spreads over all seeds.

    For seeds run in parallel, or one seed per detector fitted beforehand (`evaluate --seeds S
    --detector-dir ...`). The runs must cover the same attacks and rates and no (data set, seed)
    twice. Plots are not merged (each run keeps its own)."""
    from training.eval_schema import EvalReport, merge_reports
    from training.evaluate import write_report

    reports = []
    for run in runs:
        path = run / "evaluation.json"
        try:
            reports.append(EvalReport.model_validate_json(path.read_text()))
        except OSError as exc:
            fail(EXIT_DATA, f"cannot read {path} ({exc.strerror}); pass folders that `evaluate --out` wrote")
        except ValueError as exc:
            fail(EXIT_DATA, f"{path} is not an evaluation report ({first_line(exc)})")
    try:
        merged = merge_reports(reports)
    except ValueError as exc:
        fail(EXIT_USAGE, f"cannot merge: {exc}")
    write_report(merged, out)
    console.print(f"merged {len(reports)} run(s), seeds {merged.config.seeds}: {out / 'evaluation.md'}")

