"""Filters a user would write instead of depois-stream, doing the same work, for bench_peers.py.

Each does what ``depois-stream run`` does to a record (decode the binary wire format, score with
the same ONNX model, route to clean / quarantine / dead-letter with the same headers, produce,
commit after the outputs were acknowledged) with another client or framework, written the way
a competent user would write it in an afternoon. ``run(...)`` returns the destination counts,
so the benchmark can check that every filter reached the same verdicts.
"""
