"""Every encoding of steps and outputs, in one place: JSON steps in, binary frames in, and the engine
core's packed outputs (``service/ipc.py``) out as JSON text or as binary frames.

Binary frames (WebSocket ``/v1/stream``, docs/api.md), all little-endian:

- request: ``u32 id, u32 L, i64 start`` (16 bytes; ``start`` = -1 appends), then ``L * input_size``
  float32 (step-major).
- answer: ``u32 id, u32 L, i64 start, u32 replayed, u32 n_out, u32 num_classes, u32 spike_bytes``
  (32 bytes), then ``L * num_classes`` float32 scores, ``L`` int32 predicted classes, and
  ``L * spike_bytes`` bytes of spikes, bit-packed per step (spike ``i``: byte ``i // 8``, bit ``i % 8``).
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from typing import Any

import numpy as np

from service.errors import InvalidInput, TooManySteps

REQUEST_HEADER = struct.Struct("<IIq")
ANSWER_HEADER = struct.Struct("<IIqIIII")
_COMMA, _ZERO, _OPEN, _CLOSE = ord(","), ord("0"), ord("["), ord("]")
# the largest finite value of each model dtype: a finite JSON number beyond it would become inf
MAX_FINITE = {"float32": float(np.finfo(np.float32).max), "float64": float(np.finfo(np.float64).max),
              "float16": float(np.finfo(np.float16).max), "bfloat16": 3.3895313892515355e38}


def shape_text(lead: str, shape: tuple[int, ...]) -> str:
    return "(" + ", ".join([lead, *map(str, shape)]) + ")"


def may_hold_booleans(text: str | bytes) -> bool:
    """Whether a JSON message could hold ``true``/``false`` anywhere (then ``numbers`` must scan for them).
    A body of bytes is searched as UTF-8; one in UTF-16 or UTF-32 (which ``json.loads`` reads too, telling
    them by their first bytes) may hold them in a form the search cannot see, so it may."""
    if isinstance(text, str):
        return "true" in text or "false" in text
    return b"true" in text or b"false" in text or json.detect_encoding(text) not in ("utf-8", "utf-8-sig")


def numbers(raw: Any, field: str, want: str, maybe_bools: bool = True) -> np.ndarray:
    """JSON numbers (nested lists) as float64; a 422 naming ``field`` and the shape ``want`` for anything
    else. Integers past 64 bits are numbers too (2**64 is a fine float32); one too large for any float is
    refused as too large, not as a non-number. numpy turns ``[true, 0.5]`` into ``[1.0, 0.5]``, so a
    number array is scanned for booleans unless the caller knows there are none (``maybe_bools=False``:
    ``may_hold_booleans`` of the message text is false)."""
    try:
        a = np.asarray(raw)
    except (ValueError, TypeError, OverflowError):  # ragged nesting
        raise InvalidInput(f"{field}: expected a regular array of numbers, shape {want}", field=field) from None
    if a.dtype.kind == "O":  # integers numpy has no integer type for, or non-numbers
        leaves = a.ravel().tolist()
        bad = next((x for x in leaves if type(x) is not int and type(x) is not float), leaves)
        if bad is not leaves:
            text = ("null" if bad is None else json.dumps(bad)[:40] if isinstance(bad, str | bool)
                    else type(bad).__name__)
            raise InvalidInput(f"{field}: expected numbers in shape {want}, got {text}", field=field)
        try:
            a = np.array(leaves, dtype=np.float64).reshape(a.shape)
        except OverflowError:
            raise InvalidInput(f"{field}: an integer too large for any float (magnitude over "
                               f"{MAX_FINITE['float64']:.6g})", field=field) from None
    if a.dtype.kind not in "iuf":  # booleans, strings, nulls, objects are not numbers
        what = ("a ragged list or non-numbers" if a.dtype.kind == "O" else
                "booleans" if a.dtype.kind == "b" else
                "strings" if a.dtype.kind in "US" else f"non-numbers (dtype {a.dtype.kind!r})")
        raise InvalidInput(f"{field}: expected numbers in shape {want}, got {what}", field=field)
    if maybe_bools and a.size:
        leaves: Any = raw
        for _ in range(a.ndim - 1):
            leaves = itertools.chain.from_iterable(leaves)
        if any(type(x) is bool for x in leaves):
            raise InvalidInput(f"{field}: expected numbers in shape {want}, got a boolean (true/false)",
                               field=field)
    return a.astype(np.float64, copy=False)


class ModelCodec:
    """Encodings for one model, built from the engine core's model info."""

    def __init__(self, info: dict[str, Any]):
        self.name = info["name"]
        self.input_shape = tuple(info["input_shape"])
        self.input_size = math.prod(self.input_shape)
        self.output_shape = tuple(info["output_shape"])
        self.n_out = math.prod(self.output_shape)
        self.spike_bytes = (self.n_out + 7) // 8
        self.classes = info["num_classes"]
        self.labels = list(info["class_names"])
        self.horizon: int | None = info.get("horizon")  # masked PSN: T, the steps a session may take
        self._labels_json = [json.dumps(label) for label in self.labels]
        self.wire = np.dtype(info["wire_dtype"])
        self.max_value = min(MAX_FINITE[info["model_dtype"]], info.get("max_input", math.inf))
        self.model_dtype = info["model_dtype"]
        digits = 17 if self.wire == np.float64 else 9  # the fewest digits that give the float back exactly
        self._score_fmt = ",".join([f"%.{digits}g"] * self.classes)
        # JSON text of each packed spike byte (bit 0 first); the last byte may hold fewer than 8 spikes
        tail = self.n_out - 8 * (self.spike_bytes - 1)
        self._byte_text = [",".join("01"[(b >> i) & 1] for i in range(8)) for b in range(256)]
        self._last_text = [",".join("01"[(b >> i) & 1] for i in range(tail)) for b in range(256)]

    # ----- inputs ------------------------------------------------------------------------------
    def check_values(self, a: np.ndarray, field: str) -> None:
        if not a.size:
            return
        top = float(np.abs(a).max())  # one pass: NaN propagates through max, and inf is past any dtype's limit
        if top <= self.max_value:
            return
        if not np.isfinite(a).all():
            raise InvalidInput(f"{field}: contains NaN or Inf; every value must be finite", field=field)
        if self.max_value == MAX_FINITE[self.model_dtype]:
            raise InvalidInput(f"{field}: a value's magnitude exceeds {self.max_value:.6g}, the largest finite "
                               f"{self.model_dtype} of model {self.name!r}", field=field)
        raise InvalidInput(f"{field}: a value's magnitude exceeds {self.max_value:.6g}, the largest input model "
                           f"{self.name!r} takes (its max_input in GET /v1/models: past it the first layer's "
                           f"{self.model_dtype} current could overflow)", field=field)

    def json_steps(self, raw: Any, max_steps: int, field: str = "steps",
                   maybe_bools: bool = True) -> tuple[int, bytes]:
        """A JSON list of L steps, each of ``input_shape`` -> (L, payload in the wire dtype)."""
        want = shape_text("L", self.input_shape)
        if not isinstance(raw, list) or not raw:
            raise InvalidInput(f"{field}: expected a non-empty list of steps, shape {want}", field=field)
        if len(raw) > max_steps:
            raise TooManySteps(f"{field}: {len(raw)} steps in one request, at most {max_steps} allowed", field=field)
        a = numbers(raw, field, want, maybe_bools)
        if a.shape[1:] != self.input_shape:
            raise InvalidInput(f"{field}: expected shape {want}, got {a.shape}", field=field)
        self.check_values(a, field)
        return a.shape[0], a.astype(self.wire, copy=False).tobytes()

    def binary_steps(self, data: bytes, max_steps: int) -> tuple[int, int, int, bytes]:
        """A binary request frame -> (id, start or -1, L, payload in the wire dtype)."""
        if len(data) < REQUEST_HEADER.size:
            raise InvalidInput(f"frame: {len(data)} bytes, shorter than the {REQUEST_HEADER.size}-byte header "
                               "(u32 id, u32 L, i64 start)", field="frame")
        msg_id, L, start = REQUEST_HEADER.unpack_from(data)
        if L < 1:
            raise InvalidInput("frame: L = 0; a steps frame carries at least one step", field="L")
        if L > max_steps:
            raise TooManySteps(f"L: {L} steps in one request, at most {max_steps} allowed", field="L")
        if start < -1:
            raise InvalidInput(f"start: {start}; expected a step index >= 0, or -1 to append", field="start")
        want = REQUEST_HEADER.size + 4 * L * self.input_size
        if len(data) != want:
            raise InvalidInput(f"frame: {len(data)} bytes; L={L} steps of shape {shape_text('L', self.input_shape)} "
                               f"float32 need {want} (16-byte header + {4 * L * self.input_size})", field="frame")
        a = np.frombuffer(data, np.float32, offset=REQUEST_HEADER.size)
        self.check_values(a, "steps")
        payload = a.tobytes() if self.wire == np.float32 else a.astype(self.wire).tobytes()
        return msg_id, start, L, payload

    # ----- outputs -----------------------------------------------------------------------------
    def arrays(self, L: int, spikes: bytes, scores: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Engine outputs -> spikes (L, n_out) uint8 0/1, scores (L, C) wire dtype."""
        packed = np.frombuffer(spikes, np.uint8).reshape(L, self.spike_bytes)
        return (np.unpackbits(packed, axis=-1, count=self.n_out, bitorder="little"),
                np.frombuffer(scores, self.wire).reshape(L, self.classes))

    def json_outputs(self, start: int, L: int, spikes: bytes, scores: bytes) -> list[str]:
        """One JSON text per step: ``{"index","spikes","scores","predicted","label"}``."""
        sc = np.frombuffer(scores, self.wire).reshape(L, self.classes)
        pred = sc.argmax(-1).tolist()
        if len(self.output_shape) == 1 and L * self.spike_bytes <= 512:  # few bytes: a table lookup per byte
            texts = self._spike_texts_small(L, spikes)
        else:
            texts = self._spike_texts(self.arrays(L, spikes, scores)[0])
        fmt, labels = self._score_fmt, self._labels_json
        return [f'{{"index":{start + i},"spikes":{texts[i]},"scores":[{fmt % tuple(row)}],"predicted":{p},'
                f'"label":{labels[p]}}}' for i, (row, p) in enumerate(zip(sc.tolist(), pred, strict=True))]

    def score_text(self, row: np.ndarray) -> str:
        """One step's scores as JSON numbers (no brackets)."""
        return self._score_fmt % tuple(row.tolist())

    def _spike_texts_small(self, L: int, spikes: bytes) -> list[str]:
        nb, table, last = self.spike_bytes, self._byte_text, self._last_text
        out = []
        for k in range(L):
            row = spikes[k * nb:(k + 1) * nb]
            head = ",".join([table[b] for b in row[:-1]])
            out.append(f"[{head},{last[row[-1]]}]" if head else f"[{last[row[-1]]}]")
        return out

    def _spike_texts(self, sp: np.ndarray) -> list[str]:
        L = sp.shape[0]
        if len(self.output_shape) != 1:  # nested outputs (conv layers last): plain json
            return [json.dumps(row, separators=(",", ":")) for row in sp.reshape(L, *self.output_shape).tolist()]
        width = 2 * self.n_out + 1  # "[" d "," d ... d "]"
        buf = np.full((L, width), _COMMA, dtype=np.uint8)
        buf[:, 0], buf[:, -1] = _OPEN, _CLOSE
        buf[:, 1::2] = sp + _ZERO
        text = buf.tobytes().decode("ascii")
        return [text[i * width:(i + 1) * width] for i in range(L)]

    def binary_answer(self, msg_id: int, start: int, replayed: int, L: int, spikes: bytes, scores: bytes) -> bytes:
        sc = np.frombuffer(scores, self.wire).reshape(L, self.classes)
        pred = sc.argmax(-1).astype("<i4")
        return b"".join((ANSWER_HEADER.pack(msg_id, L, start, replayed, self.n_out, self.classes, self.spike_bytes),
                         sc.astype("<f4", copy=False).tobytes(), pred.tobytes(), spikes))


def join_object(fields: dict[str, Any], outputs: list[str]) -> str:
    """``fields`` as JSON with a last member ``"outputs": [...]`` made of ready step texts."""
    head = json.dumps(fields, separators=(",", ":"))[:-1]
    return f'{head},"outputs":[{",".join(outputs)}]}}'
