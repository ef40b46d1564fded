"""Shared fixtures: one real local broker per test session, and fast contract-conforming models."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory):
    """A real Tansu broker on a free loopback port (in-memory: topics live for this session).

    Tests must use unique topic and group names (see ``unique``) since the broker is shared.
    """
    from depois_stream.sim.broker import LocalBroker

    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with LocalBroker(log_path=log) as b:
        yield b


@pytest.fixture(params=["kafka-python", "confluent-kafka"])
def kafka_client(request: pytest.FixtureRequest) -> str:
    """Each delivery test runs with both client libraries behind the filter's client seam."""
    if request.param == "confluent-kafka":
        pytest.importorskip("confluent_kafka", reason="pip install 'depois-stream[fast]'")
    return request.param


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> str:
    """A short name unique to this test, for topics and consumer groups on the shared broker."""
    import re
    import uuid

    base = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name)[:40]
    return f"{base}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def digits_arrays():
    from tests.helpers.onnx_models import digits_split

    return digits_split()


@pytest.fixture(scope="session")
def centroid_model(tmp_path_factory: pytest.TempPathFactory, digits_arrays) -> Path:
    """A fast, real (class-centroid) detector on digits honouring the ONNX contract."""
    from tests.helpers.onnx_models import build_centroid_model

    xtr, ytr, _, _ = digits_arrays
    path = tmp_path_factory.mktemp("model") / "centroid.onnx"
    build_centroid_model(path, xtr, ytr, num_classes=10)
    return path
