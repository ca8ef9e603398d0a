"""The front end's input parsing and small text helpers (service/frontend/codec.py), at their edges: the
exact bounds (largest finite value, exactly PSN_MAX_STEPS_PER_REQUEST steps), what must be refused as
invalid input rather than fail as a 500 (ragged lists, short frames, integers too large for a float,
booleans wherever they hide), and the exact text of what is joined by hand. Written for the one-line
changes of codec.py a mutation sweep found the suite let through (2026-12-07). Outputs and frames:
tests/service/test_codec.py and test_frames.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.errors import InvalidInput, TooManySteps
from service.frontend.codec import (
    MAX_FINITE,
    REQUEST_HEADER,
    ModelCodec,
    join_object,
    may_hold_booleans,
    numbers,
    shape_text,
)


def codec(input_shape=(2,), output_shape=(3,), classes=3, wire="<f4") -> ModelCodec:
    return ModelCodec({"name": "m", "input_shape": list(input_shape), "output_shape": list(output_shape),
                       "num_classes": classes, "class_names": [f"c{i}" for i in range(classes)],
                       "wire_dtype": wire, "model_dtype": "float32"})


def frame(L, start=-1, values=None, input_size=2):
    v = np.zeros(L * input_size, np.float32) if values is None else np.asarray(values, np.float32)
    return REQUEST_HEADER.pack(1, L, start) + v.tobytes()


# ----- may_hold_booleans ------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ['[false]', '{"a": false}', b'[false]'])
def test_may_hold_booleans_sees_false(text):
    assert may_hold_booleans(text)


@pytest.mark.parametrize("enc", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-16"])
def test_may_hold_booleans_is_true_for_non_utf8_bodies(enc):
    assert may_hold_booleans('[[1, 2]]'.encode(enc))


def test_may_hold_booleans_is_false_for_plain_utf8():
    assert not may_hold_booleans('[[1, 2]]') and not may_hold_booleans(b'[[1, 2]]')


# ----- numbers ----------------------------------------------------------------------------------------
def test_numbers_accepts_floats_beside_huge_integers():
    assert numbers([2**64, 0.5], "f", "(L,)").tolist() == [2.0**64, 0.5]


def test_numbers_refuses_a_boolean_in_a_nested_float_array():
    with pytest.raises(InvalidInput, match="boolean"):
        numbers([[0.5, True]], "f", "(L, 2)")


def test_numbers_refuses_all_booleans_even_when_told_there_are_none():
    with pytest.raises(InvalidInput, match="booleans"):
        numbers([True, False], "f", "(L,)", maybe_bools=False)


def test_numbers_refuses_ragged_lists_as_invalid_input():
    with pytest.raises(InvalidInput):
        numbers([[1.0, 2.0], [3.0]], "f", "(L, 2)")


def test_numbers_refuses_an_integer_too_large_for_any_float():
    with pytest.raises(InvalidInput, match="too large"):
        numbers([2**1100], "f", "(L,)")


# ----- check_values / json_steps ----------------------------------------------------------------------
def test_the_largest_finite_value_is_accepted():
    m = MAX_FINITE["float32"]
    L, payload = codec().json_steps([[m, -m]], 4)
    assert L == 1 and np.frombuffer(payload, np.float32).tolist() == [m, -m]


@pytest.mark.parametrize("bad", [-1e39, float("-inf")])
def test_large_negative_values_are_refused(bad):
    with pytest.raises(InvalidInput):
        codec().json_steps([[bad, 0.0]], 4)
    with np.errstate(over="ignore"):  # -1e39 in float32 is -inf: what a binary frame can carry
        values = [np.float32(bad), 0.0]
    with pytest.raises(InvalidInput):
        codec().binary_steps(frame(1, values=values), 4)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_value_among_finite_ones_is_named_as_such(bad):
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        codec().check_values(np.array([1.0, bad]), "steps")


def test_check_values_of_an_empty_array_passes():
    codec().check_values(np.zeros((0,), np.float32), "steps")


def test_json_steps_refuses_an_empty_list_as_empty():
    with pytest.raises(InvalidInput, match="non-empty"):
        codec().json_steps([], 4)
    with pytest.raises(InvalidInput):  # a scalar-input model: [] would otherwise be (L=0, b"")
        codec(input_shape=()).json_steps([], 4)


def test_json_steps_takes_exactly_max_steps():
    assert codec().json_steps([[0.0, 1.0]] * 4, 4)[0] == 4
    with pytest.raises(TooManySteps):
        codec().json_steps([[0.0, 1.0]] * 5, 4)


def test_json_steps_refuses_extra_trailing_dimensions():
    with pytest.raises(InvalidInput, match="shape"):
        codec().json_steps([[[1.0, 2.0], [3.0, 4.0]]], 4)


# ----- binary_steps -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 8, 15])
def test_binary_steps_refuses_a_short_header_as_invalid_input(n):
    with pytest.raises(InvalidInput):
        codec().binary_steps(b"\0" * n, 4)


def test_binary_steps_takes_exactly_max_steps():
    assert codec().binary_steps(frame(4), 4)[2] == 4
    with pytest.raises(TooManySteps):
        codec().binary_steps(frame(5), 4)


# ----- outputs / helpers ------------------------------------------------------------------------------
def test_arrays_reads_scores_in_the_wire_dtype():
    sc = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
    spikes, scores = codec(output_shape=(3,), wire="<f8").arrays(2, bytes([0b101, 0b010]), sc.tobytes())
    assert scores.dtype == np.float64 and scores.tolist() == sc.tolist()
    assert spikes.tolist() == [[1, 0, 1], [0, 1, 0]]


def test_score_text_keeps_class_order():
    assert json.loads("[" + codec().score_text(np.array([1.0, 2.0, 3.0], np.float32)) + "]") == [1.0, 2.0, 3.0]


def test_shape_text():
    assert shape_text("L", (2, 3)) == "(L, 2, 3)" and shape_text("L", ()) == "(L)"


def test_join_object_is_compact_json_with_outputs_last():
    text = join_object({"a": 1, "b": "x"}, ['{"i":0}', '{"i":1}'])
    assert text == '{"a":1,"b":"x","outputs":[{"i":0},{"i":1}]}'
    assert json.loads(text) == {"a": 1, "b": "x", "outputs": [{"i": 0}, {"i": 1}]}


def test_check_values_names_the_problem():
    c = codec()
    with pytest.raises(InvalidInput, match="exceeds"):  # finite but past float32: not "NaN or Inf"
        c.check_values(np.array([1.0, 1e39]), "steps")
    with pytest.raises(InvalidInput, match="NaN or Inf"):  # all NaN
        c.check_values(np.array([np.nan, np.nan]), "steps")
