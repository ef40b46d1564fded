"""Turn selected quarantine records into things a reviewer can judge: files, pictures, counts.

``export`` writes a self-contained folder (JSONL manifest, NPZ arrays, PNG contact sheets) that
can be copied off the cluster and reviewed offline; ``rescore`` answers "would the next model
let these through?" without publishing anything. Both decode the original record bytes with the
same decoder as the consumer, so what a reviewer sees is exactly what the detector saw.

matplotlib is imported only when a PNG is drawn: the consumer image does not need it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel

from depois_stream.audit.trail import RecordLocation
from depois_stream.audit.metrics import ReplayMetrics
from depois_stream.audit.records import QuarantinedRecord
from depois_stream.contract.wire import DecodeError, decode_image

if TYPE_CHECKING:  # onnxruntime is loaded only by the commands that score
    from depois_stream.filter.detector import Detector

MANIFEST = "manifest.jsonl"
SAMPLES = "samples.npz"
SHEET_COLS = 10
SHEET_CELLS = 100
# samples.npz keeps ids as a fixed-width unicode array (what plain ``np.load`` reads without
# pickles), and such an array pads every id to the longest one: a single 900,000-character key
# among 1,000 records made it 3.6 GB to write and again to load. So ids there are cut to this
# many characters; manifest.jsonl keeps them whole (its npz_index joins the two).
NPZ_ID_CHARS = 256


@dataclass
class Decoded:
    """Images of the records that decoded, and a reason for each one that did not."""

    images: np.ndarray  # float32 [M, C, H, W]
    labels: np.ndarray  # int64 [M]
    rows: list[int]  # position in the record list of each decoded image
    errors: dict[int, str]  # record position -> why it could not be decoded


def decode_records(records: Sequence[QuarantinedRecord],
                   input_shape: tuple[int, int, int] | None = None,
                   num_classes: int | None = None) -> Decoded:
    """Decode every record's value into one shape: ``input_shape`` (a model's), or without it
    the shape most of the records have (see ``common_shape``).

    One shape per export or rescore keeps the NPZ a single array; a record of another shape
    (a different data set on the same topic) is reported as a decode error, not resized.
    Without a model, which shape is the norm must not depend on which record is read first: one
    odd record first would otherwise make every other sample "undecodable".
    """
    errors: dict[int, str] = {}
    decoded: dict[int, tuple[int, np.ndarray]] = {}  # record position -> (label, image)
    for i, r in enumerate(records):
        if r.value is None:
            errors[i] = "record has no value (tombstone)"
            continue
        try:
            _, label, image = decode_image(r.value, r.content_type, input_shape=input_shape,
                                           num_classes=num_classes)
        except DecodeError as exc:
            errors[i] = str(exc)
            continue
        decoded[i] = (label, image)
    shape = input_shape or common_shape([image.shape for _, image in decoded.values()])
    for i, (_, image) in list(decoded.items()):
        if image.shape != shape:
            del decoded[i]
            errors[i] = (f"shape_mismatch: image shape {list(image.shape)} is not "
                         f"{list(shape or ())}, the shape most of the selected records have "
                         "(samples.npz holds one shape); select the records of this shape on "
                         "their own to export them")
    rows = sorted(decoded)
    c, h, w = shape or (1, 1, 1)
    return Decoded(
        images=(np.stack([decoded[i][1] for i in rows]) if rows
                else np.zeros((0, c, h, w), dtype=np.float32)),
        labels=np.asarray([decoded[i][0] for i in rows], dtype=np.int64), rows=rows,
        errors=dict(sorted(errors.items())),
    )


def common_shape(shapes: Sequence[tuple[int, ...]]) -> tuple[int, int, int] | None:
    """The most common of ``shapes`` (ties: the first seen), or ``None`` when there are none."""
    if not shapes:
        return None
    c, h, w = Counter(tuple(s) for s in shapes).most_common(1)[0][0]
    return c, h, w


# ---------------------------------------------------------------- export

class ManifestEntry(BaseModel):
    """One line of ``manifest.jsonl``: the record's verdict, provenance and where to find it."""

    id: str
    release_id: str  # the ingest record (topic:partition:offset): keys can repeat, this cannot
    label: int | None
    score: float | None
    boundary: float | None
    p_value: float | None
    model_version: str | None
    model_sha256: str | None
    reason: str
    provenance: RecordLocation | None  # the original ingest record
    quarantine: RecordLocation  # the record this entry was read from
    timestamp: str | None  # ISO-8601 UTC of the quarantine record
    npz_index: int | None  # row in samples.npz; None when the value did not decode
    sheet: str | None  # contact sheet PNG holding the image
    cell: int | None  # its cell number on that sheet (printed as #cell)
    decode_error: str | None = None


class ExportSummary(BaseModel):
    folder: Path
    records: int
    decoded: int
    decode_failed: int
    sheets: list[str]


def export(records: Sequence[QuarantinedRecord], folder: Path, *,
           metrics: ReplayMetrics | None = None) -> ExportSummary:
    """Write manifest, NPZ and contact sheets for ``records`` into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    dec = decode_records(records)
    entries = manifest_entries(records, dec)
    (folder / MANIFEST).write_text("".join(e.model_dump_json() + "\n" for e in entries),
                                   encoding="utf-8")
    scores = np.array([_nan(records[i].score) for i in dec.rows], dtype=np.float32)
    np.savez_compressed(
        folder / SAMPLES, images=dec.images, labels=dec.labels,
        ids=np.array([records[i].sample_id[:NPZ_ID_CHARS] for i in dec.rows], dtype=str),
        scores=scores,
        boundaries=np.array([_nan(records[i].boundary) for i in dec.rows], dtype=np.float32))
    sheets = _sheet_names(len(dec.rows))
    for s, name in enumerate(sheets):
        cells = slice(s * SHEET_CELLS, (s + 1) * SHEET_CELLS)
        captions = [f"#{c} y={lab}\n{_fmt(sc)}" for c, (lab, sc) in
                    enumerate(zip(dec.labels[cells].tolist(), scores[cells].tolist()))]
        render_contact_sheet(dec.images[cells], captions, folder / name,
                             title=f"quarantine review sheet {s + 1}/{len(sheets)}: "
                                   f"#cell y=label, score below (see {MANIFEST})")
    if metrics is not None:
        outcomes = metrics.replay_outcomes
        outcomes.labels(action="export", outcome="exported").inc(len(dec.rows))
        outcomes.labels(action="export", outcome="decode_failed").inc(len(dec.errors))
    return ExportSummary(folder=folder, records=len(records), decoded=len(dec.rows),
                         decode_failed=len(dec.errors), sheets=sheets)


def _sheet_names(n_images: int) -> list[str]:
    return [f"contact_{s:03d}.png" for s in range(math.ceil(n_images / SHEET_CELLS))]


def manifest_entries(records: Sequence[QuarantinedRecord], dec: Decoded) -> list[ManifestEntry]:
    """One entry per record, decoded or not, pointing at its NPZ row and contact-sheet cell."""
    npz_row = {row: k for k, row in enumerate(dec.rows)}
    sheets = _sheet_names(len(dec.rows))
    out = []
    for i, r in enumerate(records):
        k = npz_row.get(i)
        out.append(ManifestEntry(
            id=r.sample_id, release_id=r.release_id,
            label=int(dec.labels[k]) if k is not None else r.label,
            score=r.score, boundary=r.boundary, p_value=r.p_value,
            model_version=r.model_version, model_sha256=r.model_sha256, reason=r.reason,
            provenance=r.source, quarantine=r.location, timestamp=_iso(r.location.timestamp_ms),
            npz_index=k, sheet=sheets[k // SHEET_CELLS] if k is not None else None,
            cell=k % SHEET_CELLS if k is not None else None, decode_error=dec.errors.get(i),
        ))
    return out


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _fmt(x: float) -> str:
    return "score ?" if math.isnan(x) else f"{x:.3g}"


def _iso(ms: int | None) -> str | None:
    if ms is None or ms < 0:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def mosaic(images: np.ndarray, cols: int, pad: int) -> np.ndarray:
    """[N,C,H,W] in [0,1] -> one [rows*(H+pad), cols*(W+pad), 3] picture on a white ground.

    One image per figure keeps a 100-cell sheet to one imshow call instead of 100 axes.
    """
    n, c, h, w = images.shape
    rows = max(1, math.ceil(n / cols))
    rgb = images[:, :3] if c >= 3 else np.repeat(images[:, :1], 3, axis=1)
    out = np.ones((rows * (h + pad), cols * (w + pad), 3), dtype=np.float32)
    for k in range(n):
        y, x = (k // cols) * (h + pad), (k % cols) * (w + pad)
        out[y:y + h, x:x + w] = np.clip(rgb[k].transpose(1, 2, 0), 0.0, 1.0)
    return out


def render_contact_sheet(images: np.ndarray, captions: Sequence[str], path: Path,
                         title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, _, h, w = images.shape
    cols = min(SHEET_COLS, max(1, n))
    rows = max(1, math.ceil(n / cols))
    pad = max(2, h // 2)  # room for the two caption lines under each cell
    fig = Figure(figsize=(1.3 * cols, 1.5 * rows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.92))
    ax.imshow(mosaic(images, cols, pad), interpolation="nearest")
    for k, caption in enumerate(captions):
        ax.text((k % cols) * (w + pad) + w / 2, (k // cols) * (h + pad) + h, caption,
                ha="center", va="top", fontsize=7)
    ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    fig.savefig(path)


# ---------------------------------------------------------------- rescore

class LabelCounts(BaseModel):
    selected: int
    would_pass: int


class RescoreReport(BaseModel):
    model_path: Path
    model_version: str
    selected: int
    scored: int
    decode_failed: int
    would_pass: int
    by_label: dict[int, LabelCounts]
    histogram: Path | None


def rescore(records: Sequence[QuarantinedRecord], detector: Detector,
            histogram: Path | None = None, *, metrics: ReplayMetrics | None = None) -> RescoreReport:
    """Score ``records`` with ``detector`` and count what it would let through; publish nothing.

    "Would pass" is the new model's own verdict (score at or above its boundary for that class),
    so per-class boundaries and p-value models are judged exactly as the consumer would.
    """
    meta = detector.metadata
    dec = decode_records(records, input_shape=meta.input_shape, num_classes=meta.num_classes)
    result = detector.run(dec.images, dec.labels)
    passed = ~np.asarray(result.poisoned, dtype=bool)
    selected = Counter(dec.labels.tolist())
    passing = Counter(dec.labels[passed].tolist())
    report = RescoreReport(
        model_path=detector.path, model_version=meta.model_version,
        selected=len(records), scored=len(dec.rows), decode_failed=len(dec.errors),
        would_pass=int(passed.sum()),
        by_label={k: LabelCounts(selected=v, would_pass=passing.get(k, 0))
                  for k, v in sorted(selected.items())},
        histogram=histogram,
    )
    if histogram is not None:
        render_histogram(result.score, passed, float(meta.boundary.global_), histogram,
                         title=f"rescore with {meta.model_version}: {report.would_pass}/"
                               f"{report.scored} would pass")
    if metrics is not None:
        outcomes = metrics.replay_outcomes
        outcomes.labels(action="rescore", outcome="would_pass").inc(report.would_pass)
        outcomes.labels(action="rescore", outcome="would_quarantine").inc(
            report.scored - report.would_pass)
    return report


def render_histogram(scores: np.ndarray, passed: np.ndarray, boundary: float, path: Path,
                     title: str) -> None:
    """Score histogram split by the new verdict, with the global boundary when it is in view."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size:
        lo, hi = float(scores.min()), float(scores.max())
        ax.hist([scores[passed], scores[~passed]], bins=30, range=(lo, max(hi, lo + 1e-6)),
                stacked=True, label=["would pass", "would stay quarantined"],
                color=["tab:green", "tab:red"])
        span = max(hi - lo, 1e-6)
        if lo - span <= boundary <= hi + span:
            ax.axvline(boundary, color="k", linestyle="--", label=f"boundary {boundary:.3g}")
        else:
            title += f" (boundary {boundary:.3g} off scale)"
        ax.legend(fontsize=8)
    ax.set_xlabel("score under the new model (higher = more trustworthy)")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)

