"""The engine core: one process per device that owns the models, the session slots and the session
table, and runs one loop (``proc.py``): schedule -> execute -> commit.

- ``sessions.py``: session ids, slot free lists, idle expiry, the retry window of recent outputs.
- ``scheduler.py``: which pending requests run together (plain Python, no tensors).
- ``runner.py``: one model's backend call over a batch, outputs as packed arrays.
- ``engine.py``: the requests (open, steps, close, classify ...) over those parts, and one engine step.
- ``proc.py``: the process: ZeroMQ in and out, signals, the busy loop.
"""
