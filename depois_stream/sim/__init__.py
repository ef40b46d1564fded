"""Simulation kit for demos, tests and benchmarks: data sets, numpy attacks, a producer, a local broker, the demo."""
