"""Contract-conforming ONNX models built from numpy in milliseconds, for runtime tests.

The runtime tests need a real model file that honours ``depois_stream.contract`` without paying
for GAN training in every test module. This builds a genuine (if simple) detector: the score is
the negative mean squared distance between the image and the centroid of its *claimed* class,
so a flipped label really does score low. The trained De-Pois model is exercised separately.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from depois_stream.contract import (
    Boundary, ModelCard, ModelMetadata, SCHEMA_VERSION, card_path_for, sha256_file, utc_now_iso,
)


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn digits as float32 [N,1,8,8] in [0,1], split by the project's one digits rule."""
    from depois_stream.sim.datasets import load_dataset

    d = load_dataset("digits")
    return d.train.images, d.train.labels, d.test.images, d.test.labels


def centroid_scores(centroids: np.ndarray, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1)
    return -np.mean((flat - centroids[labels]) ** 2, axis=1).astype(np.float32)


def build_centroid_model(
    path: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    boundary: float | None = None,
    target_fpr: float = 0.05,
    model_version: str = "centroid-test-1",
    write_card: bool = True,
) -> ModelMetadata:
    """Fit class centroids on (images, labels), set the boundary at ``target_fpr`` on the same data
    unless given, and write ``path`` (+ its model card)."""
    shape = tuple(int(d) for d in images.shape[1:])
    dim = int(np.prod(shape))
    centroids = np.stack([images[labels == k].reshape(-1, dim).mean(0) for k in range(num_classes)])
    centroids = centroids.astype(np.float32)
    if boundary is None:
        boundary = float(np.quantile(centroid_scores(centroids, images, labels), target_fpr))
    meta = ModelMetadata(
        schema_version=SCHEMA_VERSION, boundary=Boundary(**{"global": boundary}),
        target_fpr=target_fpr, input_shape=shape, num_classes=num_classes, dataset="test-centroid",
        score_kind="critic", model_version=model_version, created_at=utc_now_iso(),
    )
    n = "N"
    nodes = [
        helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
        helper.make_node("Gather", ["centroids", "label"], ["mu"], axis=0),
        helper.make_node("Sub", ["flat", "mu"], ["diff"]),
        helper.make_node("Mul", ["diff", "diff"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes1"], ["msd"], keepdims=0),
        helper.make_node("Neg", ["msd"], ["score"]),
        helper.make_node("Less", ["score", "boundary"], ["poisoned"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, dim], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(centroids, "centroids"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes1"),
        numpy_helper.from_array(np.array(boundary, dtype=np.float32), "boundary"),
    ]
    graph = helper.make_graph(
        nodes, "centroid_detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [n, *shape]),
         helper.make_tensor_value_info("label", TensorProto.INT64, [n])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [n]),
         helper.make_tensor_value_info("poisoned", TensorProto.BOOL, [n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    helper.set_model_props(model, meta.to_props())
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    if write_card:
        card = ModelCard(onnx_file=path.name, onnx_sha256=sha256_file(path), metadata=meta,
                         dataset=meta.dataset, sizes={"fit": int(len(labels))})
        card_path_for(path).write_text(json.dumps(card.model_dump(mode="json"), indent=2))
    return meta
