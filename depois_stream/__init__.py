"""depois-stream: the De-Pois data-poisoning defense as a Kafka stream filter.

The runtime package deliberately depends on onnxruntime and never on torch, so the consumer
image stays small; everything that needs torch lives in the separate ``training`` package.
"""

__version__ = "0.1.0"
