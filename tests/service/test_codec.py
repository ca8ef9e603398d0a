"""The front end's codec without a server: packed engine outputs to JSON text and binary answers, and
binary request frames in, checked against numpy's own bit unpacking and the documented layout."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from service.errors import InvalidInput, TooManySteps
from service.frontend.codec import ModelCodec
from tests.service.test_frames import frame, read_answer


def codec(output_shape: tuple[int, ...], classes: int = 3, wire: str = "<f4") -> ModelCodec:
    return ModelCodec({"name": "m", "input_shape": [2], "output_shape": list(output_shape), "num_classes": classes,
                       "class_names": [f"c{i}" for i in range(classes)], "wire_dtype": wire,
                       "model_dtype": "float32"})


def packed(rng: np.random.Generator, L: int, n_out: int) -> tuple[np.ndarray, bytes]:
    """Random spikes (L, n_out) and the engine's packing of them (bit i of a step: byte i // 8, bit i % 8)."""
    sp = rng.integers(0, 2, (L, n_out), np.uint8)
    return sp, np.packbits(sp, axis=-1, bitorder="little").tobytes()


@pytest.mark.parametrize("n_out", [1, 3, 8, 9, 16, 17, 128])
@pytest.mark.parametrize("L", [1, 7, 600])  # 600 steps: past the per-byte table, the vectorised text path
def test_json_outputs_spell_every_spike_score_and_prediction(n_out: int, L: int) -> None:
    c, rng = codec((n_out,)), np.random.default_rng(n_out * 1000 + L)
    sp, spikes = packed(rng, L, n_out)
    sc = rng.standard_normal((L, 3)).astype(np.float32)
    texts = c.json_outputs(40, L, spikes, sc.tobytes())
    assert len(texts) == L
    for i, text in enumerate(texts):
        o = json.loads(text)
        assert o["index"] == 40 + i and o["spikes"] == sp[i].tolist()
        assert np.float32(o["scores"]).tolist() == sc[i].tolist()  # 9 digits give each float32 back
        assert o["predicted"] == int(sc[i].argmax()) and o["label"] == f"c{sc[i].argmax()}"


def test_json_outputs_of_a_nested_output_shape_keep_the_shape() -> None:
    c, rng = codec((2, 3, 2)), np.random.default_rng(1)
    sp, spikes = packed(rng, 4, 12)
    texts = c.json_outputs(0, 4, spikes, np.zeros((4, 3), np.float32).tobytes())
    assert [json.loads(t)["spikes"] for t in texts] == sp.reshape(4, 2, 3, 2).tolist()


def test_binary_answers_follow_the_documented_layout() -> None:
    c, rng = codec((17,), classes=3, wire="<f8"), np.random.default_rng(2)
    sp, spikes = packed(rng, 5, 17)
    sc = rng.standard_normal((5, 3))
    data = c.binary_answer(7, 11, 2, 5, spikes, sc.tobytes())
    assert struct.unpack_from("<IIqIIII", data) == (7, 5, 11, 2, 17, 3, 3)
    a = read_answer(data)  # the documented layout, read by the binary-frame tests' own reader
    assert a["scores"].tolist() == sc.astype(np.float32).tolist()
    assert a["predicted"].tolist() == sc.argmax(-1).tolist() and a["spikes"] == sp.tolist()


def test_binary_steps_frames_in() -> None:
    c = codec((3,))
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert c.binary_steps(frame(x, 9), 64) == (9, -1, 3, x.tobytes())
    assert c.binary_steps(frame(x, 9, 0), 64)[1] == 0
    c64 = codec((3,), wire="<f8")  # a float64 model gets float64 payloads of the same values
    assert c64.binary_steps(frame(x, 1, 5), 64)[3] == x.astype(np.float64).tobytes()
    bad = [(frame(x, 1, -2), "start"),  # only -1 means "append"
           (frame(x[:0], 1), "L"),
           (frame(x, 1)[:-8], "frame"),  # fewer floats than L steps need
           (frame(x, 1) + b"\0", "frame"),
           (b"\1\0\0\0", "frame"),  # shorter than the header
           (frame(np.array([[np.nan, 0]]), 1), "steps"),
           (frame(np.array([[np.inf, 0]]), 1), "steps")]
    for data, field in bad:
        with pytest.raises(InvalidInput) as e:
            c.binary_steps(data, 64)
        assert e.value.field == field, (field, str(e.value))
    with pytest.raises(TooManySteps):
        c.binary_steps(frame(np.zeros((65, 2)), 1), 64)
