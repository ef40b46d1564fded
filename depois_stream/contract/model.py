"""The ONNX model contract shared by ``training`` (which writes it) and the runtime (which reads it).

One file carries everything the consumer needs: the graph, the detection boundary, the input
shape and the provenance. Keeping the contract in the torch-free runtime package means the
exporter and the scorer cannot drift apart: both import these names and this pydantic model.

Graph I/O:
    inputs  ``image`` float32 [N, C, H, W] in [0, 1]; ``label`` int64 [N]; N is dynamic.
    outputs ``score`` float32 [N] (higher = more trustworthy);
            ``poisoned`` bool [N] (score below the boundary of that sample's class);
            ``p_value`` float32 [N] (optional: conformal p-value against the calibration split);
            ``evidence`` float32 [N, K] (optional: one p-value per evidence member, named in
            order by the ``depois.evidence_members`` metadata). ``score`` is
            ``log min_j (p_j / w_j)`` with the member weights ``w`` of ``depois.evidence_weights``
            (all 1 when absent), so the member with the smallest ``p_j / w_j`` names the reason.
            A column may be an *agreement* of other columns (``depois.evidence_agreements``:
            Fisher's sum of their log p-values, calibrated as its own p-value); to the consumer
            it is one more named column.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from depois_stream.contract.files import open_regular

SCHEMA_VERSION = "1"

INPUT_IMAGE = "image"
INPUT_LABEL = "label"
OUTPUT_SCORE = "score"
OUTPUT_POISONED = "poisoned"
OUTPUT_P_VALUE = "p_value"
OUTPUT_EVIDENCE = "evidence"

REQUIRED_INPUTS = (INPUT_IMAGE, INPUT_LABEL)
REQUIRED_OUTPUTS = (OUTPUT_SCORE, OUTPUT_POISONED)

# metadata_props keys (all values are strings in ONNX).
META_PREFIX = "depois."
META_SCHEMA_VERSION = "depois.schema_version"
META_BOUNDARY = "depois.boundary"
META_TARGET_FPR = "depois.target_fpr"
META_INPUT_SHAPE = "depois.input_shape"
MAX_CLASSES = 1_000_000
# A model's version and member names travel in the headers of every routed record, inside the
# pipeline's fixed allowance for the filter's own headers (HEADER_ALLOWANCE): bounded here.
MAX_MODEL_VERSION = 128
MAX_MEMBER_NAME = 64
MAX_INPUT_VALUES = 1 << 26  # C x H x W of one sample: 64 M values, far past any image model
META_NUM_CLASSES = "depois.num_classes"
META_DATASET = "depois.dataset"
META_SCORE_KIND = "depois.score_kind"
META_MODEL_VERSION = "depois.model_version"
META_CREATED_AT = "depois.created_at"
META_WEIGHTS_SHA256 = "depois.weights_sha256"
META_HAS_P_VALUE = "depois.has_p_value"
META_EVIDENCE_MEMBERS = "depois.evidence_members"  # comma-separated, column order of `evidence`
META_EVIDENCE_WEIGHTS = "depois.evidence_weights"  # comma-separated floats, same order; absent = all 1
# "name=member+member+...;name=..." : evidence columns that combine other columns (absent = none)
META_EVIDENCE_AGREEMENTS = "depois.evidence_agreements"

ScoreKind = Literal["critic", "fused", "union"]


class ContractError(ValueError):
    """A model file that does not honour the contract; the message says what to fix."""


class Boundary(BaseModel):
    """Detection boundary: a sample is poisoned when its score is below its class's threshold.

    ``global_`` is always set (it is the fallback and what dashboards show); ``per_class`` is
    present when the boundary was calibrated per class. ``paper_mean_k_std`` records the
    original De-Pois rule (mean - k*std of the calibration scores) for comparison only.
    """

    # A NaN boundary makes every comparison false: nothing would ever be quarantined, and the
    # load-time check that the graph agrees with it would pass for the same reason.
    model_config = ConfigDict(populate_by_name=True, frozen=True, allow_inf_nan=False)

    global_: float = Field(alias="global")
    per_class: list[float] | None = None
    paper_mean_k_std: float | None = None
    paper_k: float | None = None

    def for_labels(self, labels: "object") -> "object":
        """Vectorised threshold per sample (numpy array in, numpy array out)."""
        import numpy as np

        labels = np.asarray(labels, dtype=np.int64)
        if self.per_class is None:
            return np.full(labels.shape, self.global_, dtype=np.float32)
        return np.asarray(self.per_class, dtype=np.float32)[labels]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(by_alias=True, exclude_none=True), sort_keys=True)


class ModelMetadata(BaseModel):
    """Typed view of the ``depois.*`` metadata_props of a model file."""

    model_config = ConfigDict(frozen=True)

    schema_version: str
    boundary: Boundary
    target_fpr: float = Field(gt=0.0, lt=1.0)
    input_shape: tuple[int, int, int]
    # Bounded so that a corrupt or hostile value fails here, not as a multi-GB allocation.
    num_classes: int = Field(ge=2, le=MAX_CLASSES)
    dataset: str
    score_kind: ScoreKind
    model_version: str = Field(min_length=1, max_length=MAX_MODEL_VERSION)
    created_at: str
    weights_sha256: str | None = None
    has_p_value: bool = False
    evidence_members: tuple[str, ...] = ()
    evidence_weights: tuple[float, ...] = ()  # each member's share of the false-alarm budget (weighted min-p)
    # agreement columns and their members, ((name, (member, ...)), ...); a tuple keeps the model hashable
    evidence_agreements: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @field_validator("evidence_weights")
    @classmethod
    def _positive_weights(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (w > 0.0 and w < float("inf")) for w in v):
            raise ValueError(f"evidence weights must be positive and finite, got {list(v)}")
        return v

    @field_validator("evidence_members")
    @classmethod
    def _member_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if not name or not all(c.isalnum() or c == "_" for c in name):
                raise ValueError(f"evidence member names must be non-empty [A-Za-z0-9_], got {name!r}")
            if len(name) > MAX_MEMBER_NAME:
                raise ValueError(f"evidence member names must be at most {MAX_MEMBER_NAME} "
                                 f"characters, got one of {len(name)}")
        if len(set(v)) != len(v):
            raise ValueError(f"evidence member names must be unique, got {list(v)}")
        return v

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: str) -> str:
        if v != SCHEMA_VERSION:
            raise ValueError(
                f"model schema_version {v!r} is not supported by this runtime (expects "
                f"{SCHEMA_VERSION!r}); re-export the model with a matching depois-train"
            )
        return v

    @field_validator("input_shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(d <= 0 for d in v):
            raise ValueError(f"input_shape must be positive, got {v}")
        if v[0] * v[1] * v[2] > MAX_INPUT_VALUES:
            raise ValueError(f"input_shape {list(v)} has more than {MAX_INPUT_VALUES} values per "
                             "sample")
        return v

    @model_validator(mode="after")
    def _per_class_matches(self) -> "ModelMetadata":
        pc = self.boundary.per_class
        if pc is not None and len(pc) != self.num_classes:
            raise ValueError(
                f"boundary.per_class has {len(pc)} entries but num_classes is {self.num_classes}"
            )
        if self.evidence_weights and len(self.evidence_weights) != len(self.evidence_members):
            raise ValueError(f"{len(self.evidence_weights)} evidence weights for "
                             f"{len(self.evidence_members)} evidence members")
        names = [name for name, _ in self.evidence_agreements]
        if len(set(names)) != len(names):
            raise ValueError(f"evidence agreement names must be unique, got {names}")
        plain = set(self.evidence_members) - set(names)
        for name, parts in self.evidence_agreements:
            if name not in self.evidence_members or len(parts) < 2 or len(set(parts)) != len(parts) \
                    or not set(parts) <= plain:
                raise ValueError(f"evidence agreement {name!r} must be an evidence member combining two or "
                                 f"more distinct other members, got {list(parts)}")
        return self

    def member_weights(self) -> tuple[float, ...]:
        """One weight per evidence member; models written before weights existed used equal ones."""
        return self.evidence_weights or tuple(1.0 for _ in self.evidence_members)

    def to_props(self) -> dict[str, str]:
        """Serialise to ONNX metadata_props (string -> string)."""
        props = {
            META_SCHEMA_VERSION: self.schema_version,
            META_BOUNDARY: self.boundary.to_json(),
            META_TARGET_FPR: repr(float(self.target_fpr)),
            META_INPUT_SHAPE: ",".join(str(d) for d in self.input_shape),
            META_NUM_CLASSES: str(self.num_classes),
            META_DATASET: self.dataset,
            META_SCORE_KIND: self.score_kind,
            META_MODEL_VERSION: self.model_version,
            META_CREATED_AT: self.created_at,
            META_HAS_P_VALUE: "true" if self.has_p_value else "false",
        }
        if self.weights_sha256:
            props[META_WEIGHTS_SHA256] = self.weights_sha256
        if self.evidence_members:
            props[META_EVIDENCE_MEMBERS] = ",".join(self.evidence_members)
        if self.evidence_weights:
            props[META_EVIDENCE_WEIGHTS] = ",".join(repr(float(w)) for w in self.evidence_weights)
        if self.evidence_agreements:
            props[META_EVIDENCE_AGREEMENTS] = ";".join(
                f"{name}={'+'.join(parts)}" for name, parts in self.evidence_agreements)
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> "ModelMetadata":
        """Parse ONNX metadata_props; raise ContractError naming the missing or bad key."""
        required = [
            META_SCHEMA_VERSION, META_BOUNDARY, META_TARGET_FPR, META_INPUT_SHAPE,
            META_NUM_CLASSES, META_DATASET, META_SCORE_KIND, META_MODEL_VERSION, META_CREATED_AT,
        ]
        missing = [k for k in required if k not in props]
        if missing:
            raise ContractError(
                f"model metadata lacks {', '.join(missing)}; export it with "
                "`depois-train export-onnx`, which writes every depois.* key"
            )
        try:
            return cls(
                schema_version=props[META_SCHEMA_VERSION],
                boundary=Boundary.model_validate_json(props[META_BOUNDARY]),
                target_fpr=float(props[META_TARGET_FPR]),
                input_shape=tuple(int(x) for x in props[META_INPUT_SHAPE].split(",")),
                num_classes=int(props[META_NUM_CLASSES]),
                dataset=props[META_DATASET],
                score_kind=props[META_SCORE_KIND],
                model_version=props[META_MODEL_VERSION],
                created_at=props[META_CREATED_AT],
                weights_sha256=props.get(META_WEIGHTS_SHA256),
                has_p_value=props.get(META_HAS_P_VALUE, "false") == "true",
                evidence_members=tuple(
                    m for m in props.get(META_EVIDENCE_MEMBERS, "").split(",") if m),
                evidence_weights=tuple(
                    float(w) for w in props.get(META_EVIDENCE_WEIGHTS, "").split(",") if w.strip()),
                evidence_agreements=_parse_agreements(props.get(META_EVIDENCE_AGREEMENTS, "")),
            )
        except ValidationError as exc:
            raise ContractError(f"model metadata is invalid: {first_problem(exc)}") from exc
        except ValueError as exc:
            raise ContractError(f"model metadata is invalid: {exc}") from exc


class ModelCard(BaseModel):
    """The JSON written beside the ONNX file: provenance plus the file's sha256.

    The sha256 of the ONNX file cannot live inside the file itself, so the card carries it and
    the runtime refuses a model whose bytes do not match its card (tampering or a half-copied
    file both show up here).
    """

    model_config = ConfigDict(extra="allow")

    onnx_file: str
    onnx_sha256: str
    metadata: ModelMetadata
    dataset: str
    sizes: dict[str, int] = Field(default_factory=dict)
    seed: int | None = None
    steps: dict[str, int] = Field(default_factory=dict)
    times_s: dict[str, float] = Field(default_factory=dict)
    calibration: dict[str, float] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)


def card_path_for(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.card.json`` (same folder)."""
    p = Path(model_path)
    return p.with_name(p.stem + ".card.json")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of regular file ``path`` (``OSError`` for a FIFO or device, which would block or
    never end: the hot-reload watcher hashes whatever a deployment put at the model path)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _parse_agreements(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``name=a+b;name2=c+d`` -> ((name, (a, b)), (name2, (c, d))); raises ValueError on a bad entry."""
    out = []
    for entry in (e for e in text.split(";") if e.strip()):
        name, sep, parts = entry.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{META_EVIDENCE_AGREEMENTS} entry {entry!r} is not name=member+member")
        out.append((name.strip(), tuple(p.strip() for p in parts.split("+") if p.strip())))
    return tuple(out)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): third-party errors
    (onnxruntime, model-signing, YAML, pydantic-settings) span lines, and every refusal here is
    one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def first_problem(exc: ValidationError) -> str:
    """One readable line from a pydantic error (no URLs, no dump of the input)."""
    errors = exc.errors(include_url=False, include_input=False)
    e = errors[0]
    where = ".".join(str(p) for p in e["loc"]) or "the file"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {e['msg']}{more}"
