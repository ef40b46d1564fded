"""The contract between training, the stream filter and the tools: numpy and pydantic only.

* ``model``: the ONNX model's inputs, outputs and ``depois.*`` metadata, and its model card;
* ``wire``: the ingest record format (JSON or compact binary) and the decoder that never raises;
* ``headers``: the Kafka header names the filter writes and the tools read.

Everything else in the project depends on this package and it depends on nothing of ours, so the
exporter and the runtime cannot drift apart. The model contract's names are re-exported here
(``from depois_stream.contract import ModelMetadata``).
"""

from depois_stream.contract.model import (  # noqa: F401  (re-exports)
    INPUT_IMAGE, INPUT_LABEL, META_BOUNDARY, META_CREATED_AT, META_DATASET,
    META_EVIDENCE_MEMBERS, META_EVIDENCE_WEIGHTS, META_HAS_P_VALUE, META_INPUT_SHAPE, META_MODEL_VERSION,
    META_NUM_CLASSES, META_PREFIX, META_SCHEMA_VERSION, META_SCORE_KIND, META_TARGET_FPR,
    META_WEIGHTS_SHA256, OUTPUT_EVIDENCE, OUTPUT_P_VALUE, OUTPUT_POISONED, OUTPUT_SCORE,
    REQUIRED_INPUTS, REQUIRED_OUTPUTS, SCHEMA_VERSION, Boundary, ContractError, ModelCard,
    ModelMetadata, ScoreKind, card_path_for, sha256_file, utc_now_iso,
)
