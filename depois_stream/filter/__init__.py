"""The stream filter: one consumer-group member that routes every ingest record exactly once.

Read ``app.StreamFilter.run`` for the loop; the data path is message -> decode -> score -> route
(``pipeline``, pure functions over a batch) -> produce -> commit (``delivery``), fed by the
``source`` (poll, linger, rebalances). Depends on ``depois_stream.contract`` and nothing else of
the project, and never on torch.
"""
