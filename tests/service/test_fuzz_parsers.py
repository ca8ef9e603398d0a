"""Property tests (hypothesis) of the front end's parsers and codecs, without a server: for arbitrary JSON
values (nested, huge, tiny, NaN/Inf, booleans, strings, nulls, ragged or wrongly deep lists, unknown and
duplicate keys) and arbitrary bytes, each parser either returns what the input says (float32-exact where
docs/api.md says float32) or raises the service's own client error, whose message names its field; never
anything else. Outputs are decoded by a decoder written here from docs/api.md, not by the service's codec.

Deterministic (``derandomize=True``) and a few seconds in all, so they stay in the default suite. The same
inputs against a real server: tests/service/test_fuzz_server.py."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.errors import InvalidInput, ServiceError, TooManySteps
from service.frontend.codec import MAX_FINITE, ModelCodec, join_object, may_hold_booleans
from service.frontend.fastpath import StepsFastPath
from service.frontend.oip import check_request, input_steps, sequence_id, sequence_session, split_body
from service.frontend.routes.stream import ClientMessage
from service.schemas import WsSteps, plain_json

FUZZ = settings(derandomize=True, max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
CLIENT_ERRORS = (InvalidInput, TooManySteps)
MAX_STEPS = 8


def codec(input_shape: tuple[int, ...], model_dtype: str = "float32", output_shape: tuple[int, ...] = (5,),
          classes: int = 4) -> ModelCodec:
    wire = "<f8" if model_dtype == "float64" else "<f4"  # service/core/runner.py: float64 models only
    return ModelCodec({"name": "m", "input_shape": list(input_shape), "output_shape": list(output_shape),
                       "num_classes": classes, "class_names": [f"c{i}" for i in range(classes)],
                       "wire_dtype": wire, "model_dtype": model_dtype})


CODECS = {(shape, dt): codec(shape, dt) for shape in [(1,), (3,), (2, 5)] for dt in ["float32", "float64", "float16"]}


def assert_client_error(e: ServiceError, fields: tuple[str, ...] | None = None) -> None:
    """A refusal the API documents: 4xx, a field, and a message that names it."""
    assert isinstance(e, CLIENT_ERRORS), f"{type(e).__name__}: {e.message}"
    assert 400 <= e.status < 500 and e.field, e.message
    named = e.message.partition(":")[0]
    assert e.field in e.message or named == "body", (e.field, e.message)
    if fields is not None:
        assert e.field in fields, (e.field, e.message)


# ----- strategies ---------------------------------------------------------------------------------
EDGE_FLOATS = [0.0, -0.0, 5e-324, -5e-324, 1e-45, 1.17549435e-38, 65504.0, 65520.0, 3.4028234663852886e38,
               3.4028235677973366e38, 3.5e38, -3.5e38, 1.7976931348623157e308, math.inf, -math.inf, math.nan]
EDGE_INTS = [0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**64, 2**64 + 1, 10**38, 10**39,
             10**308, 10**309, -10**400]
numbers_st = st.one_of(st.floats(width=32), st.floats(), st.integers(-2**70, 2**70), st.sampled_from(EDGE_FLOATS),
                       st.sampled_from(EDGE_INTS))
scalars = st.one_of(numbers_st, st.none(), st.booleans(), st.text(max_size=4))
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=4), kids, max_size=3), max_leaves=16)


@st.composite
def steps_like(draw: st.DrawFn, shape: tuple[int, ...]) -> Any:
    """Mostly arrays of shape (L, *shape), some with the wrong L, depth or length, or one leaf replaced."""
    L = draw(st.integers(0, MAX_STEPS + 2))
    full = (L, *shape)
    if draw(st.booleans()):  # another shape
        full = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=4)))
    n = math.prod(full)
    leaves = draw(st.lists(st.one_of(st.floats(-10, 10), numbers_st), min_size=n, max_size=n))
    arr: Any = np.array(leaves, dtype=object).reshape(full).tolist() if n else np.empty(full).tolist()
    mutation = draw(st.integers(0, 5))
    if mutation == 0 and arr:  # one leaf or row replaced by anything
        node = arr
        while isinstance(node, list) and node and isinstance(node[0], list) and draw(st.booleans()):
            node = node[0]
        if isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = draw(json_values)
    elif mutation == 1 and arr:  # a row too short or too long
        row = arr[draw(st.integers(0, len(arr) - 1))]
        if isinstance(row, list):
            row.append(0.5) if draw(st.booleans()) or not row else row.pop()
    elif mutation == 2:
        arr = draw(json_values)
    return arr


def leaves_of(x: Any, shape: tuple[int, ...]) -> list | None:
    """The leaves of ``x`` if it is a regular nested list of JSON numbers (not booleans) of ``shape``."""
    if not shape:
        return [x] if type(x) in (int, float) else None
    if not isinstance(x, list) or len(x) != shape[0]:
        return None
    out: list = []
    for item in x:
        sub = leaves_of(item, shape[1:])
        if sub is None:
            return None
        out += sub
    return out


def expected_steps(raw: Any, shape: tuple[int, ...], max_value: float) -> np.ndarray | None:
    """What docs/api.md says ``steps`` holds: float64 (L, *shape) of finite numbers within the model's
    dtype, or None (refused)."""
    if not isinstance(raw, list) or not raw or len(raw) > MAX_STEPS:
        return None
    leaves = leaves_of(raw, (len(raw), *shape))
    if leaves is None:
        return None
    try:
        values = [float(v) for v in leaves]
    except OverflowError:
        return None
    if not all(math.isfinite(v) and abs(v) <= max_value for v in values):
        return None
    return np.array(values, np.float64).reshape(len(raw), *shape)


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values, NaN included (NaN != NaN)."""
    return json.dumps(a) == json.dumps(b)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ----- JSON steps (HTTP /v1 steps and classify, WebSocket steps) ----------------------------------
@pytest.mark.parametrize("shape", [(3,), (2, 5)])
@pytest.mark.parametrize("model_dtype", ["float32", "float64", "float16"])
@FUZZ
@given(data=st.data())
def test_json_steps_are_the_inputs_values_or_a_named_refusal(shape, model_dtype, data) -> None:
    c = CODECS[shape, model_dtype]
    raw = data.draw(steps_like(shape))
    want = expected_steps(raw, shape, MAX_FINITE[model_dtype])
    text = json.dumps(raw)
    try:
        L, payload = c.json_steps(raw, MAX_STEPS, maybe_bools=may_hold_booleans(text))
    except ServiceError as e:
        assert_client_error(e, ("steps",))
        assert want is None, f"refused valid steps {raw!r}: {e.message}"
        return
    assert want is not None, f"accepted {raw!r}"
    assert L == want.shape[0] and same_bits(np.frombuffer(payload, c.wire), want.astype(c.wire).ravel())


@FUZZ
@given(raw=json_values)
def test_may_hold_booleans_sees_every_boolean_in_every_encoding(raw) -> None:
    text = json.dumps({"steps": raw})
    if "true" in text or "false" in text:  # a boolean somewhere (or the letters in a string: a harmless yes)
        for enc in ("utf-8", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be", "utf-8-sig"):
            assert may_hold_booleans(text.encode(enc)), enc
        assert may_hold_booleans(text)


# ----- the HTTP steps fast path's parse, and the WebSocket message parser ------------------------
def request_texts() -> st.SearchStrategy[str]:
    """JSON text of steps requests and messages: right, wrong, duplicate and unknown keys, NaN literals."""
    keys = st.sampled_from(["type", "steps", "start", "id", "model", "session_id", "frames", "Start", "strat", ""])
    kinds = st.sampled_from(["steps", "open", "attach", "close", "Steps", "", None, 1])

    @st.composite
    def build(draw: st.DrawFn) -> str:
        members = [("type", draw(kinds))] if draw(st.booleans()) else []
        members += [("steps", draw(steps_like((3,))))] if draw(st.integers(0, 3)) else []
        members += draw(st.lists(st.tuples(keys, json_values), max_size=3))
        draw(st.randoms()).shuffle(members)
        return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in members) + "}"  # keys may repeat

    return st.one_of(build(), json_values.map(json.dumps), st.text(max_size=20))


@FUZZ
@given(text=request_texts())
def test_the_fast_paths_parse_is_json_loads_or_hands_the_body_on(text) -> None:
    body = StepsFastPath._parse(text.encode("utf-8", "surrogatepass"))
    if body is not None:
        obj = json.loads(text)
        assert same_json(body.steps, obj["steps"]) and body.start == obj.get("start")
        assert body.start is None or (type(obj["start"]) is int and 0 <= body.start < 2**63)


@FUZZ
@given(text=request_texts())
def test_websocket_messages_parse_to_what_the_text_says_or_a_validation_error(text) -> None:
    try:
        msg = ClientMessage.validate_json(text)
    except ValidationError as e:
        assert e.errors(), text
        return
    obj = json.loads(text)
    assert msg.type == obj["type"]
    if isinstance(msg, WsSteps):
        assert same_json(msg.steps, obj["steps"])  # pydantic's parser reads numbers as json.loads does
        assert msg.start == obj.get("start") and (msg.start is None or 0 <= msg.start < 2**63)
        json.dumps(msg.id, allow_nan=False)  # an id the answer echoes is JSON a strict parser reads back


@FUZZ
@given(value=json_values)
def test_plain_json_passes_only_values_json_can_write(value) -> None:
    try:
        out = plain_json(value)
    except ValueError:
        with pytest.raises(ValueError):
            json.dumps(value, allow_nan=False)
        return
    assert out is value
    json.loads(json.dumps(out, allow_nan=False))


# ----- binary request frames -----------------------------------------------------------------------
@st.composite
def frames(draw: st.DrawFn, input_size: int) -> bytes:
    """Steps frames, mostly well formed (16-byte header, L * input_size float32), some cut or padded, some
    with another L or start, some arbitrary bytes."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=64))
    L = draw(st.one_of(st.integers(0, MAX_STEPS + 1), st.sampled_from([2**31, 2**32 - 1])))
    start = draw(st.one_of(st.integers(-3, 40), st.sampled_from([-2**63, 2**63 - 1])))
    n = min(L, MAX_STEPS + 1) * input_size
    values = draw(st.lists(st.one_of(st.floats(width=32), st.floats(-4, 4, width=32)), min_size=n, max_size=n))
    data = struct.pack("<IIq", draw(st.integers(0, 2**32 - 1)), L, start) + np.array(values, "<f4").tobytes()
    cut = draw(st.integers(-3, 3)) if draw(st.integers(0, 3)) == 0 else 0
    return data[:len(data) + cut] if cut < 0 else data + bytes(cut)


@pytest.mark.parametrize("shape", [(1,), (2, 5)])
@pytest.mark.parametrize("model_dtype", ["float32", "float64", "float16"])
@FUZZ
@given(data=st.data())
def test_binary_frames_are_the_documented_layout_or_a_named_refusal(shape, model_dtype, data) -> None:
    c = CODECS[shape, model_dtype]
    frame = data.draw(frames(c.input_size))
    try:
        msg_id, start, L, payload = c.binary_steps(frame, MAX_STEPS)
    except ServiceError as e:
        assert_client_error(e, ("frame", "L", "start", "steps"))
        ok = len(frame) >= 16 and (h := struct.unpack_from("<IIq", frame)) and 1 <= h[1] <= MAX_STEPS and \
            h[2] >= -1 and len(frame) == 16 + 4 * h[1] * c.input_size and \
            np.all(np.abs(np.frombuffer(frame, "<f4", offset=16).astype(np.float64)) <= MAX_FINITE[model_dtype])
        assert not ok, f"refused a valid frame: {e.message}"
        return
    want_id, want_L, want_start = struct.unpack_from("<IIq", frame)
    assert (msg_id, L, start) == (want_id, want_L, want_start) and 1 <= L <= MAX_STEPS and start >= -1
    values = np.frombuffer(frame, "<f4", offset=16)
    assert len(frame) == 16 + 4 * L * c.input_size and np.isfinite(values).all()
    assert float(np.abs(values).max()) <= MAX_FINITE[model_dtype]
    assert same_bits(np.frombuffer(payload, c.wire), values.astype(c.wire))  # float32 exactly as sent


# ----- outputs: JSON texts and binary answers, decoded from docs/api.md ----------------------------
def decode_answer(data: bytes) -> dict:
    """docs/api.md's answer frame: 32-byte header, L x C float32 scores, L int32 predicted, L x nb spike bytes
    (spike i of a step: bit i % 8 of byte i // 8)."""
    msg_id, L, start, replayed, n_out, C, nb = struct.unpack_from("<IIqIIII", data)
    assert nb == (n_out + 7) // 8 and len(data) == 32 + 4 * L * C + 4 * L + L * nb
    scores = [list(struct.unpack_from(f"<{C}f", data, 32 + 4 * C * k)) for k in range(L)]
    predicted = list(struct.unpack_from(f"<{L}i", data, 32 + 4 * L * C))
    base = 32 + 4 * L * C + 4 * L
    spikes = [[(data[base + k * nb + i // 8] >> (i % 8)) & 1 for i in range(n_out)] for k in range(L)]
    return {"id": msg_id, "L": L, "start": start, "replayed": replayed, "n_out": n_out, "C": C, "scores": scores,
            "predicted": predicted, "spikes": spikes}


F32_BIG = float(np.float32(3e38))


def nest(flat: list, shape: tuple[int, ...]) -> list:
    if len(shape) == 1:
        return flat
    size = math.prod(shape[1:])
    return [nest(flat[i * size:(i + 1) * size], shape[1:]) for i in range(shape[0])]


@FUZZ
@given(data=st.data())
def test_outputs_round_trip_through_json_and_binary_answers(data) -> None:
    output_shape = data.draw(st.one_of(st.tuples(st.integers(1, 40)), st.tuples(st.integers(1, 3), st.integers(1, 7))))
    classes = data.draw(st.integers(1, 6))
    model_dtype = data.draw(st.sampled_from(["float32", "float64"]))
    c = codec((3,), model_dtype, output_shape, classes)
    L = data.draw(st.one_of(st.integers(1, 8), st.integers(100, 130)))  # past 512 spike bytes: the vectorised path
    n_out = math.prod(output_shape)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))  # many values: drawn by numpy
    bits = rng.integers(0, 2, L * n_out, np.uint8) if data.draw(st.booleans()) else \
        np.full(L * n_out, data.draw(st.integers(0, 1)), np.uint8)
    spikes = np.packbits(bits.reshape(L, n_out), axis=-1, bitorder="little").tobytes()  # the engine's packing
    edges = np.array([0.0, -0.0, 1e-45, 5e-324, 1.0, -1.0, F32_BIG, -F32_BIG, 1.7e-38], c.wire)
    scores = (rng.standard_normal(L * classes) * 10.0 ** rng.integers(-40, 39, L * classes)).astype(c.wire)
    scores = np.where(rng.random(L * classes) < 0.2, rng.choice(edges, L * classes), scores).astype(c.wire)
    scores = np.clip(scores, -F32_BIG, F32_BIG).reshape(L, classes)  # binary answers: float32
    start = data.draw(st.integers(0, 2**63 - 1 - L))
    msg_id, replayed = data.draw(st.integers(0, 2**32 - 1)), data.draw(st.integers(0, L))
    texts = c.json_outputs(start, L, spikes, scores.tobytes())
    answer = decode_answer(c.binary_answer(msg_id, start, replayed, L, spikes, scores.tobytes()))
    assert (answer["id"], answer["L"], answer["start"], answer["replayed"], answer["n_out"], answer["C"]) == \
        (msg_id, L, start, replayed, n_out, classes)
    for k, text in enumerate(texts):
        o = json.loads(text)
        row = bits[k * n_out:(k + 1) * n_out].tolist()
        best = max(range(classes), key=lambda j: (scores[k, j], -j))  # the first of equal maxima
        assert o == {"index": start + k, "spikes": nest(row, output_shape), "scores": o["scores"],
                     "predicted": best, "label": f"c{best}"}
        assert (np.array(o["scores"], c.wire) == scores[k]).all()  # the fewest digits that give the float back
        assert answer["spikes"][k] == row and answer["predicted"][k] == best
        assert answer["scores"][k] == scores[k].astype(np.float32).tolist()
    fields = data.draw(st.dictionaries(st.text(max_size=5).filter(lambda k: k != "outputs"), json_values, min_size=1,
                                       max_size=3)
                       .filter(lambda d: plain_ok(d)))
    assert json.loads(join_object(fields, texts)) == {**fields, "outputs": [json.loads(t) for t in texts]}


def plain_ok(value: Any) -> bool:
    try:
        return json.loads(json.dumps(value, allow_nan=False)) == value
    except ValueError:
        return False


# ----- Open Inference Protocol v2 requests ---------------------------------------------------------
@st.composite
def infer_bodies(draw: st.DrawFn, input_shape: tuple[int, ...]) -> tuple[bytes, str | None, np.ndarray | None]:
    """(body, Inference-Header-Content-Length, the steps it carries if it is valid) of /v2 infer requests:
    valid ones (JSON data or the binary extension) and ones with one thing changed."""
    B, L = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    shape = [B, L, *input_shape]
    x = np.array(draw(st.lists(st.floats(-8, 8, width=32), min_size=math.prod(shape), max_size=math.prod(shape))),
                 np.float32).reshape(shape)
    binary = draw(st.booleans())
    tensor: dict[str, Any] = {"name": "steps", "shape": shape, "datatype": "FP32"}
    if binary:
        tensor["parameters"] = {"binary_data_size": x.nbytes}
    else:
        tensor["data"] = x.ravel().tolist()
    body: dict[str, Any] = {"inputs": [tensor]}
    if draw(st.booleans()):
        body["parameters"] = {"sequence_id": draw(st.one_of(st.integers(0, 2**64 - 1), st.text(max_size=5))),
                              "sequence_start": draw(st.booleans())}
    if draw(st.booleans()):
        body["outputs"] = [{"name": n, "parameters": {"binary_data": draw(st.booleans())}}
                           for n in draw(st.permutations(["spikes", "scores", "predicted"]))[:draw(st.integers(1, 3))]]
    blob = x.astype("<f4").tobytes() if binary else b""
    valid = B * L <= MAX_STEPS
    change = draw(st.integers(0, 3))
    if change == 1:  # one member of the body, the tensor or a parameter replaced by any JSON value
        where = draw(st.sampled_from([body, tensor, body.setdefault("parameters", {})]))
        where[draw(st.sampled_from([*where, "id", "data", "shape", "datatype", "name", "sequence_id",
                                    "sequence_end", "binary_data_output", "seq_start", "parameters"]))] = \
            draw(json_values)
        valid = False
    elif change == 2:  # the binary part cut or padded
        cut = draw(st.integers(1, 4))
        blob = blob[:-cut] if blob and draw(st.booleans()) else blob + bytes(cut)
        valid = False
    head = json.dumps(body).encode()
    length = str(len(head)) if binary or change == 2 else None
    if change == 3:
        length = draw(st.one_of(st.text(max_size=6), st.integers(-2, len(head) + len(blob) + 2).map(str)))
        valid = False
    return head + blob, length, x.astype(np.float64) if valid else None


@pytest.mark.parametrize("shape", [(1,), (3,), (2, 5)])
@FUZZ
@given(data=st.data())
def test_infer_requests_carry_their_steps_or_are_refused_naming_a_field(shape, data) -> None:
    c = CODECS[shape, "float32"]
    body, length, want = data.draw(infer_bodies(shape))
    try:
        req, binary = split_body(body, length)
        check_request(req)
        x = input_steps(req, binary, c, MAX_STEPS)
        seq = sequence_id(req.parameters)
    except ServiceError as e:
        assert_client_error(e)
        assert want is None, f"refused a valid request: {e.message}"
        return
    if want is not None:
        assert same_bits(x, want)
    else:  # a changed request that is still valid: its steps are still its values, as float32
        assert x.shape[2:] == shape and np.isfinite(x).all() and same_bits(x, x.astype(np.float32).astype(np.float64))
    assert seq is None or sequence_session("", "m", seq).startswith("oip::m:")


@FUZZ
@given(body=st.binary(max_size=80), length=st.one_of(st.none(), st.text(max_size=8)))
def test_arbitrary_infer_bodies_are_refused_naming_a_field(body, length) -> None:
    try:
        req, binary = split_body(body, length)
        check_request(req)
        input_steps(req, binary, CODECS[(1,), "float32"], MAX_STEPS)
        sequence_id(req.parameters)
    except ServiceError as e:
        assert_client_error(e)


@FUZZ
@given(params=st.dictionaries(st.sampled_from(["sequence_id", "sequence_start", "other"]), json_values, max_size=3),
       other=json_values)
def test_sequence_ids_are_uint64_or_short_strings_and_name_distinct_sessions(params, other) -> None:
    try:
        seq = sequence_id(params)
    except ServiceError as e:
        assert_client_error(e, ("sequence_id",))
        return
    raw = params.get("sequence_id")
    assert seq is None if raw in (None, 0, "") and type(raw) is not bool else seq == raw
    if seq is not None and type(other) in (int, str) and other != seq:
        try:
            other_seq = sequence_id({"sequence_id": other})
        except ServiceError:
            return
        if other_seq is not None:
            assert sequence_session("", "m", seq) != sequence_session("", "m", other_seq)
