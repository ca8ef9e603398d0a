"""JSON text of step outputs, built once per step in bulk (no per-step dicts or json.dumps calls).

A step's JSON is ``{"index": i, "spikes": [...], "scores": [...], "predicted": c, "label": "..."}``.
The engine encodes everything after the index (the "tail") for a whole batch at once; the index is
prefixed when the session applies the step; sessions keep the finished text for retries, and
responses are assembled by joining texts. Strings are also invisible to the garbage collector,
which keeps the retry window of thousands of sessions from lengthening GC pauses.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

_COMMA, _ZERO, _OPEN, _CLOSE = ord(","), ord("0"), ord("["), ord("]")


def spike_texts(spikes: torch.Tensor) -> list[list[str]]:
    """(L, B, *out) 0/1 spikes -> [L][B] JSON arrays; 1-D outputs are formatted by one numpy pass."""
    L, B = spikes.shape[:2]
    s8 = spikes.to(torch.uint8)
    if spikes.dim() != 3:  # nested outputs (conv layers last): plain json
        return [[json.dumps(row, separators=(",", ":")) for row in step] for step in s8.tolist()]
    n = spikes.shape[2]
    width = 2 * n + 1  # "[" d "," d ... d "]"
    buf = np.full((L * B, width), _COMMA, dtype=np.uint8)
    buf[:, 0], buf[:, -1] = _OPEN, _CLOSE
    buf[:, 1::2] = s8.reshape(L * B, n).numpy() + _ZERO
    text = buf.tobytes().decode("ascii")
    return [[text[(t * B + b) * width:(t * B + b + 1) * width] for b in range(B)] for t in range(L)]


def score_format(num_classes: int, dtype: torch.dtype) -> str:
    """%-format of one step's scores: the fewest digits that give back the model's float exactly
    (9 significant digits for float32 and narrower, 17 for float64); 3x faster than ``repr`` per float."""
    digits = 17 if dtype == torch.float64 else 9
    return ",".join([f"%.{digits}g"] * num_classes)


def step_tails(spikes: torch.Tensor, scores: torch.Tensor, labels_json: list[str], fmt: str) -> list[list[str]]:
    """(L, B, ...) outputs -> [L][B] JSON text of each step after its index: ``,"spikes":...}``.

    ``fmt`` comes from ``score_format``; scores are finite (the inputs and weights are).
    """
    pred = scores.argmax(-1).tolist()  # (L, B)
    sc = scores.tolist()
    sp = spike_texts(spikes)
    return [[f',"spikes":{sp[t][b]},"scores":[{fmt % tuple(sc[t][b])}],"predicted":{p},'
             f'"label":{labels_json[p]}}}' for b, p in enumerate(pred[t])] for t in range(len(pred))]


def with_index(index: int, tail: str) -> str:
    return f'{{"index":{index}{tail}'


def join_object(fields: dict[str, Any], outputs: list[str]) -> str:
    """``fields`` as JSON with a last member ``"outputs": [...]`` made of ready step texts."""
    head = json.dumps(fields, separators=(",", ":"))[:-1]
    return f'{head},"outputs":[{",".join(outputs)}]}}'
