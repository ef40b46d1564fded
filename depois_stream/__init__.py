"""depois-stream: the De-Pois data-poisoning defense as a Kafka stream filter.

Packages, and the one direction their imports go (tests/test_architecture.py keeps it so):

* ``contract``: the model, wire and header contract (numpy + pydantic only);
* ``filter``: the stream filter runtime (``depois-stream run``), depends on the contract only;
* ``audit``: replay, export, release and report tools, on top of the filter's detector;
* ``sim``: data sets, numpy attacks, a producer, a local broker and the demo.

The runtime never imports torch; training lives in the separate ``training`` package.

In-process use (a data loader, a notebook, a Spark or Ray map function)::

    from depois_stream import Detector
    det = Detector.load("model.onnx")
    pred = det.predict(images, labels)   # pred.poisoned, .score, .p_value, .reasons
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Detector", "Prediction", "__version__"]

if TYPE_CHECKING:
    from depois_stream.filter.detector import Detector, Prediction


def __getattr__(name: str) -> Any:
    # Lazy: `import depois_stream` (for the contract, or the version) must not load onnxruntime.
    if name in ("Detector", "Prediction"):
        from depois_stream.filter import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'depois_stream' has no attribute {name!r}")
