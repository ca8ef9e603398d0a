"""Property test (hypothesis) against the real service: a mix of malformed and valid requests over the four
ways in (WebSocket JSON, WebSocket binary frames, HTTP /v1 steps, OIP /v2 infer of a sequence and of whole
sequences), each judged by what docs/api.md says of it: a valid request is answered 2xx with the outputs of
the reference model (the float64 parallel form) for everything its session has accepted; anything else is a
4xx in the API's error shape naming a field (over the WebSocket an ``error`` frame, after which the
connection is used on), and changes nothing: each session's next valid step has the index one past the last
accepted one. No 5xx, no hang, no lost connection. The parsers alone: test_fuzz_parsers.py.

A fixed derandomized run of a few examples, a few seconds, so it stays in the default suite."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from tests.service.conftest import DEFAULTS, Reference, Server, assert_outputs
from tests.service.test_frames import read_answer
from tests.service.test_fuzz_parsers import MAX_STEPS, expected_steps, frames, json_values, steps_like

MODEL, SHAPE, WINDOW = "sliding", (3,), 16  # PSN_RETRY_WINDOW's default
FP32_MAX, F64_MAX = float(np.finfo(np.float32).max), float(np.finfo(np.float64).max)
CLIENT_CODES = {"invalid_input", "too_many_steps", "request_too_large", "step_gap", "retry_too_old", "model_not_found",
                "model_cannot_stream", "session_not_found"}
RUN = settings(derandomize=True, max_examples=6, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def srv(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server({**DEFAULTS, "model_dir": model_dir, "max_steps_per_request": MAX_STEPS, "max_sessions": 1024},
               tmp_path_factory.mktemp("fuzz")).start()
    yield s
    s.stop()


def assert_error(error: Any, status: int | None = None) -> None:
    """The API's error shape (docs/api.md, Errors): a client error's code, a field the message names."""
    assert isinstance(error, dict) and set(error) <= {"code", "message", "field", "retry_after"}, error
    assert error["code"] in CLIENT_CODES and error["field"], error
    stem = error["field"].split(".")[0].split("_")[0].lower()  # session_id: "session 'x' does not exist"
    assert stem in error["message"].lower() or error["message"].startswith("body:"), error
    assert status is None or 400 <= status < 500, (status, error)


class Session:
    """What one session has accepted: its inputs, in order, as the float64 the model ran, and the reference
    outputs of each step. The reference is the model's own step form, one step at a time (float64): causal by
    construction, so it stays the reference where a finite input as large as float64 allows overflows inside
    the network (the parallel form's matrix product then spreads the NaN of 0 x inf to earlier steps)."""

    def __init__(self, ref: Reference):
        self.ref, self.net = ref, ref.models[MODEL].net
        self.state = self.net.initial_state(1, dtype=torch.float64)
        self.inputs: list[np.ndarray] = []
        self.spikes: list[list[int]] = []
        self.scores: list[list[float]] = []

    def outcome(self, start: int | None, x: np.ndarray) -> tuple[int, int] | str:
        """(first index, replayed) of a request of steps ``x`` from ``start`` (None: append), or the error code."""
        t = len(self.inputs)
        start = t if start is None else start
        if start > t:
            return "step_gap"
        replayed = min(t - start, len(x))
        if replayed and start < t - min(t, WINDOW):
            return "retry_too_old"
        return start, replayed

    @torch.no_grad()
    def add(self, x: np.ndarray) -> None:
        for x_t in torch.tensor(np.asarray(x, np.float64).reshape(-1, *SHAPE)):
            out, self.state = self.net.step(x_t[None], self.state)
            self.inputs.append(x_t.numpy())
            self.spikes.append(out.spikes[0].to(torch.uint8).tolist())
            self.scores.append(out.scores[0].tolist())

    def accept(self, outputs: list[dict], start: int, replayed: int, x: np.ndarray, *, tol: float = 1e-9) -> None:
        """Outputs of a request answered from ``start``: the last ``len(x) - replayed`` of ``x`` are new; every
        output is the reference's for the inputs accepted (a replayed step: its first input's)."""
        self.add(x[replayed:])
        assert len(outputs) == len(x) and start + len(x) <= len(self.inputs)
        assert_outputs(outputs, (self.spikes, self.scores), start, rel=tol, abs=tol)


def streamed(ref: Reference, x: np.ndarray) -> tuple[list, list]:
    """The reference outputs of a whole sequence: what streaming it gives (docs/api.md, Classify)."""
    s = Session(ref)
    s.add(x)
    return s.spikes, s.scores


def binary_outputs(data: bytes) -> tuple[dict, list[dict]]:
    a = read_answer(data)
    return a, [{"index": a["start"] + k, "spikes": a["spikes"][k], "scores": a["scores"][k].tolist(),
                "predicted": int(a["predicted"][k])} for k in range(a["L"])]


def messages(draw: st.DrawFn) -> tuple[str, Any]:
    """A WebSocket text message that is, or is close to, a steps message; never a valid open, attach or close
    (those would change the connection's session). Returns (text, json.loads of it or None)."""
    members: list[tuple[str, Any]] = []
    kind = draw(st.sampled_from(["steps", "steps", "Steps", "", None, 1, "open", "close"]))
    if draw(st.integers(0, 5)):
        members.append(("type", kind))
    if draw(st.integers(0, 4)):
        members.append(("steps", draw(steps_like(SHAPE))))
    if draw(st.booleans()):
        members.append(("start", draw(st.one_of(st.integers(-2, 40), json_values))))
    if draw(st.booleans()):
        members.append(("id", draw(json_values)))
    members += draw(st.lists(st.tuples(st.sampled_from(["start", "steps", "Start", "model", "frames", "x"]),
                                       json_values), max_size=1))
    text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in members) + "}"
    if kind in ("open", "close") and set(k for k, _ in members) <= {"type", "model", "frames"}:
        text = text.replace('"type"', '"tipe"')  # a valid open or close: make it unknown fields instead
    if draw(st.integers(0, 7)) == 0:
        text = draw(st.sampled_from([text[:-1], text + "}", "[" + text + "]", draw(st.text(max_size=12))]))
    try:
        return text, json.loads(text)
    except ValueError:
        return text, None


def valid_steps(obj: Any, keys: set[str]) -> tuple[np.ndarray, int | None] | None:
    """(steps, start) of a JSON object that is a valid steps request with members ``keys`` at most."""
    if not isinstance(obj, dict) or not set(obj) <= keys or "steps" not in obj:
        return None
    start = obj.get("start")
    if start is not None and (type(start) is not int or not 0 <= start < 2**63):
        return None
    if "id" in obj:
        try:
            json.dumps(obj["id"], allow_nan=False)
        except ValueError:
            return None
    x = expected_steps(obj["steps"], SHAPE, F64_MAX)  # the served models are float64
    return None if x is None else (x, start)


def fp32_steps(draw: st.DrawFn, L: int | None = None) -> np.ndarray:
    L = draw(st.integers(1, 4)) if L is None else L
    return np.array(draw(st.lists(st.floats(-4, 4, width=32), min_size=3 * L, max_size=3 * L)),
                    np.float32).reshape(L, 3).astype(np.float64)


def retry_start(draw: st.DrawFn, s: Session) -> int | None:
    t = len(s.inputs)
    return draw(st.one_of(st.none(), st.integers(max(0, t - 8), t)))


# ----- one request of each way in ------------------------------------------------------------------------
def lone_surrogate(value: Any) -> bool:
    """Whether a JSON value holds a lone surrogate (json.loads takes "\\ud800", strict parsers refuse it)."""
    if isinstance(value, str):
        return any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    if isinstance(value, list):
        return any(lone_surrogate(v) for v in value)
    return isinstance(value, dict) and any(lone_surrogate(k) or lone_surrogate(v) for k, v in value.items())


def echoed_id(obj: Any) -> Any:
    """The id an answer to this message carries (docs/api.md): its own, unless the message is not strict JSON or
    the id is NaN or Infinity."""
    if not isinstance(obj, dict) or lone_surrogate(obj):
        return None
    try:
        json.dumps(obj.get("id"), allow_nan=False)
    except ValueError:
        return None
    return obj.get("id")


def ws_text(draw: st.DrawFn, s: Session) -> tuple[str | bytes, Any]:
    """A WebSocket message for a JSON connection, and what it is (checked by ``ws_answer``)."""
    kind = draw(st.integers(0, 9))
    if kind < 4:
        x, start = fp32_steps(draw), retry_start(draw, s)
        msg_id = draw(json_values.filter(lambda v: echoed_id({"id": v}) == v))
        return json.dumps({"type": "steps", "steps": x.tolist(), "start": start, "id": msg_id}), ((x, start), msg_id)
    if kind == 4:  # an open or attach that fails: the connection keeps its session
        return json.dumps(draw(st.sampled_from([{"type": "open", "model": "nope"}, {"type": "open", "model": "full"},
                                                {"type": "attach", "session_id": "nope"},
                                                {"type": "open", "model": MODEL, "frames": "xml"},
                                                {"type": "attach", "session_id": 1}]))), (None, None)
    if kind == 5:  # a binary frame on a JSON connection
        x = fp32_steps(draw)
        return struct.pack("<IIq", 3, len(x), -1) + x.astype("<f4").tobytes(), (None, 3)
    text, obj = messages(draw)
    want = valid_steps(obj, {"type", "steps", "start", "id"}) if isinstance(obj, dict) and \
        obj.get("type") == "steps" and not lone_surrogate(obj) else None
    return text, (want, echoed_id(obj))


def ws_answer(answer: str | bytes, sent: str | bytes, expect: Any, s: Session) -> None:
    want, msg_id = expect
    msg = json.loads(answer)
    outcome = s.outcome(want[1], want[0]) if want is not None else None
    if isinstance(outcome, tuple):
        assert msg["type"] == "steps" and msg["id"] == msg_id, (sent[:300], msg)
        assert (msg["start"], msg["replayed"]) == outcome
        s.accept(msg["outputs"], *outcome, want[0])
    else:
        assert msg["type"] == "error", (sent[:300], msg)
        assert_error(msg["error"])
        assert outcome is None or msg["error"]["code"] == outcome
        assert msg["id"] == msg_id, (sent[:300], msg)


def ws_frame(draw: st.DrawFn, s: Session) -> tuple[str | bytes, Any]:
    """A message for a binary connection, and what it is (checked by ``frame_answer``)."""
    if draw(st.integers(0, 9)) == 0:  # JSON steps on a binary connection: refused, naming the mode
        return json.dumps({"type": "steps", "steps": fp32_steps(draw).tolist()}), None
    if draw(st.booleans()):
        x, start = fp32_steps(draw), retry_start(draw, s)
        return struct.pack("<IIq", 7, len(x), -1 if start is None else start) + x.astype("<f4").tobytes(), None
    return draw(frames(3)), None


def frame_answer(answer: str | bytes, data: str | bytes, expect: Any, s: Session) -> None:
    if isinstance(data, str):
        msg = json.loads(answer)
        assert msg["type"] == "error" and "binary" in msg["error"]["message"], msg
        return assert_error(msg["error"])
    header = struct.unpack_from("<IIq", data) if len(data) >= 16 else None
    valid = header is not None and 1 <= header[1] <= MAX_STEPS and header[2] >= -1 and \
        len(data) == 16 + 12 * header[1] and np.isfinite(np.frombuffer(data, "<f4", offset=16)).all()
    if not valid:
        msg = json.loads(answer)
        assert msg["type"] == "error", msg
        assert_error(msg["error"])
        assert msg["id"] == (header[0] if header is not None else None), msg  # the frame's id, when readable
        return
    x = np.frombuffer(data, "<f4", offset=16).astype(np.float64).reshape(-1, 3)
    outcome = s.outcome(None if header[2] == -1 else header[2], x)
    if isinstance(outcome, str):
        msg = json.loads(answer)
        assert msg["type"] == "error" and msg["error"]["code"] == outcome and msg["id"] == header[0], msg
        return assert_error(msg["error"])
    assert isinstance(answer, bytes), answer
    a, outputs = binary_outputs(answer)
    assert (a["id"], a["start"], a["replayed"]) == (header[0], *outcome)
    s.accept(outputs, *outcome, x, tol=1e-6)  # scores: float32 in frames


def ws_burst(draw: st.DrawFn, ws, s: Session, binary: bool) -> None:
    """1-4 messages sent before any answer is read: answered in order, each as if alone."""
    make, check = (ws_frame, frame_answer) if binary else (ws_text, ws_answer)
    sent = []
    for _ in range(draw(st.integers(1, 4))):
        message, expect = make(draw, s)
        ws.send(message)
        sent.append((message, expect))
    for message, expect in sent:
        check(ws.recv(timeout=20), message, expect, s)


def http_steps(draw: st.DrawFn, c: httpx.Client, sid: str, s: Session) -> None:
    content_type = "application/json"
    if draw(st.booleans()):
        x, start = fp32_steps(draw), retry_start(draw, s)
        body = {"steps": x.tolist()} if start is None else {"steps": x.tolist(), "start": start}
        raw, want = json.dumps(body).encode(), (x, start)
    else:
        text, obj = messages(draw)
        obj = obj if not isinstance(obj, dict) else {k: v for k, v in obj.items() if k != "type"}
        text = json.dumps(obj) if obj is not None and draw(st.booleans()) else text
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        want = valid_steps(obj, {"steps", "start"})
        raw = text.encode("utf-8", "surrogatepass") if draw(st.integers(0, 5)) else text.encode("utf-16")
        if draw(st.integers(0, 9)) == 0:
            raw = draw(st.binary(max_size=30))
            want = None
    if draw(st.integers(0, 9)) == 0:  # a JSON body, but not said to be one
        content_type, want = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", ""])), None
    r = c.post(f"/v1/sessions/{sid}/steps", content=raw, headers={"content-type": content_type} if content_type else {})
    outcome = s.outcome(want[1], want[0]) if want is not None else None
    if isinstance(outcome, tuple):
        assert r.status_code == 200, (raw[:300], r.text)
        body = r.json()
        assert (body["start"], body["replayed"]) == outcome
        s.accept(body["outputs"], *outcome, want[0])
        assert body["steps_seen"] == len(s.inputs)
    else:
        assert 400 <= r.status_code < 500, (raw[:300], r.status_code, r.text)
        assert_error(r.json()["error"], r.status_code)
        assert outcome is None or r.json()["error"]["code"] == outcome


def shape_of(x: Any) -> tuple[int, ...] | None:
    """The shape of a regular nested list of JSON numbers (not booleans), else None."""
    if type(x) in (int, float):
        return ()
    if not isinstance(x, list):
        return None
    shapes = {shape_of(item) for item in x}
    if None in shapes or len(shapes) > 1:
        return None
    return (len(x), *shapes.pop()) if x else (0,)


def tensor_steps(tensor: dict, blob: bytes, sequence: bool) -> np.ndarray | None:
    """The float64 steps (B, L, 3) an infer request's only input carries, if docs/api.md takes it."""
    shape, params, data = tensor.get("shape"), tensor.get("parameters"), tensor.get("data")
    if tensor.get("name") != "steps" or tensor.get("datatype") != "FP32" or not isinstance(shape, list) or \
            len(shape) != 3 or any(type(d) is not int for d in shape) or shape[2] != 3 or min(shape[:2]) < 1 or \
            shape[0] * shape[1] > MAX_STEPS or sequence and shape[0] != 1:
        return None
    if params is not None and not isinstance(params, dict):
        return None
    size, flag = (params or {}).get("binary_data_size"), (params or {}).get("binary_data")
    if size is not None and (type(size) is not int or size < 0) or flag is not None and type(flag) is not bool:
        return None
    if size is not None:
        if data is not None or size != 4 * math.prod(shape) or len(blob) != size:
            return None
        a = np.frombuffer(blob, "<f4").astype(np.float64)
    else:
        if blob or data is not None and not isinstance(data, list) or shape_of(data or []) is None:
            return None
        a = np.array(data or [], np.float64).ravel() if all(abs(v) < 2**1023 for v in np.ravel(data or [])) else None
        if a is None or a.size != math.prod(shape):
            return None
    return a.reshape(shape) if np.isfinite(a).all() and (a.size == 0 or np.abs(a).max() <= FP32_MAX) else None


def infer_tensor(draw: st.DrawFn, x: np.ndarray) -> tuple[dict, bytes, bool]:
    """The ``steps`` tensor of ``x`` (B, L, 3), JSON or binary (then True), maybe with one member changed or
    the binary part cut or padded."""
    binary = draw(st.booleans())
    tensor: dict[str, Any] = {"name": "steps", "shape": list(x.shape), "datatype": "FP32"}
    if binary:
        tensor["parameters"] = {"binary_data_size": 4 * x.size}
    else:
        tensor["data"] = x.ravel().tolist()
    blob = x.astype("<f4").tobytes() if binary else b""
    change = draw(st.integers(0, 4))
    if change == 1:
        member = draw(st.sampled_from(["name", "shape", "datatype", "data", "parameters"]))
        tensor[member] = draw(st.one_of(json_values, st.sampled_from(
            [[x.shape[0], x.shape[1] + 1, 3], [x.shape[1], x.shape[0], 3], "FP64", "fp32", "Steps", [FP32_MAX * 2],
             [math.nan] * x.size, [True] * x.size, x.tolist(), {"binary_data_size": 4 * x.size + 4}])))
    elif change == 2:
        blob = blob[:-1] if blob and draw(st.booleans()) else blob + b"\0\0\0\0"
    return tensor, blob, binary


OUTPUTS = {"spikes": "<u1", "scores": "<f4", "predicted": "<i8"}
PARAMETERS = ["sequence_end", "sequence_start", "binary_data_output", "seq_start", "Sequence_Start", "priority"]


def outputs_ok(value: Any) -> bool:
    """Whether ``outputs`` of an infer request is one docs/api.md takes (names known, none twice, strict flags)."""
    if value is None:
        return True
    if not isinstance(value, list):
        return False
    names = [o.get("name") if isinstance(o, dict) else None for o in value]
    params = [o.get("parameters") if isinstance(o, dict) else None for o in value]
    return all(n in OUTPUTS for n in names) and len(set(names)) == len(names) and all(
        p is None or isinstance(p, dict) and p.get("binary_data") in (None, True, False) and
        type(p.get("binary_data")) in (type(None), bool) and
        (p.get("binary_data_size") is None or type(p.get("binary_data_size")) is int and p["binary_data_size"] >= 0)
        for p in params)


def body_change(draw: st.DrawFn, body: dict) -> bool:
    """One member of an infer request's body (id, outputs, a parameter) changed; whether it is still valid."""
    member = draw(st.sampled_from(["id", "outputs", "parameter"]))
    if member == "id":
        body["id"] = draw(st.one_of(json_values, st.text(max_size=5)))
        return body["id"] is None or isinstance(body["id"], str)
    if member == "outputs":
        body["outputs"] = draw(st.one_of(json_values, st.lists(st.fixed_dictionaries(
            {"name": st.sampled_from([*OUTPUTS, "spike"])}, optional={"parameters": st.fixed_dictionaries(
                {}, optional={"binary_data": st.one_of(st.booleans(), json_values)})}), max_size=4)))
        return outputs_ok(body["outputs"])
    name = draw(st.sampled_from(PARAMETERS))
    value = draw(json_values)
    if name in ("sequence_start", "sequence_end") and type(value) is bool:
        value = str(value).lower()  # a real start or end would change the sequence: its string, refused
    body.setdefault("parameters", {})[name] = value
    return name == "priority" or name == "binary_data_output" and type(value) is bool


def oip_outputs(r: httpx.Response) -> dict[str, np.ndarray]:
    """An infer answer's outputs: JSON ``data``, or binary blobs after the JSON header (docs/api.md)."""
    n = int(r.headers.get("inference-header-content-length", len(r.content)))
    head, blobs = json.loads(r.content[:n]), r.content[n:]
    out = {}
    for t in head["outputs"]:
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[t["name"]] = np.array(t["data"]).reshape(t["shape"])
        else:
            out[t["name"]] = np.frombuffer(blobs[:size], OUTPUTS[t["name"]]).reshape(t["shape"])
            blobs = blobs[size:]
    assert not blobs
    return out


def oip(draw: st.DrawFn, c: httpx.Client, seq: int, s: Session) -> None:
    if draw(st.integers(0, 3)) == 0:  # whole sequences, no session
        B, L = draw(st.integers(1, 3)), draw(st.integers(1, 4))
        x, params = fp32_steps(draw, B * L).reshape(B, L, 3), {}
    else:
        x, params = fp32_steps(draw)[None], {"sequence_id": seq}
    tensor, blob, binary = infer_tensor(draw, x)
    want = tensor_steps(tensor, blob, bool(params))
    body: dict[str, Any] = {"inputs": [tensor], **({"parameters": params} if params else {})}
    if draw(st.integers(0, 2)) == 0 and not body_change(draw, body):
        want = None
    head = json.dumps(body).encode()
    headers = {"inference-header-content-length": str(len(head))} if binary or blob else {}
    if draw(st.integers(0, 9)) == 0:
        headers = {"inference-header-content-length": draw(st.sampled_from(["", "-1", "x", str(len(head) + 99)]))}
        want = None
    r = c.post(f"/v2/models/{MODEL}/infer", content=head + blob, headers=headers)
    if want is None:
        assert 400 <= r.status_code < 500 and r.status_code != 404, (head[:300], r.status_code, r.text)
        err = r.json()["error"]
        assert isinstance(err, str) and ":" in err, err  # OIP's shape: {"error": "field: message"}
        return
    assert r.status_code == 200, (head[:300], r.text)
    out = oip_outputs(r)
    asked = [o["name"] for o in body.get("outputs") or []] or list(OUTPUTS)
    assert list(out) == asked
    for b in range(want.shape[0]):
        outputs = [{"index": k, "spikes": out["spikes"][b, k].tolist() if "spikes" in out else None,
                    "scores": out["scores"][b, k].tolist() if "scores" in out else None,
                    "predicted": int(out["predicted"][b, k]) if "predicted" in out else None}
                   for k in range(want.shape[1])]
        spikes, scores = streamed(s.ref, want[b]) if not params else (None, None)
        if params:
            start = len(s.inputs)
            s.add(want[0])
            spikes, scores = s.spikes[start:], s.scores[start:]
        for k, o in enumerate(outputs):
            assert o["spikes"] in (None, spikes[k])
            assert o["scores"] is None or o["scores"] == pytest.approx(scores[k], rel=1e-6, abs=1e-6)
            assert o["predicted"] in (None, int(np.argmax(scores[k])))


@RUN
@given(data=st.data())
def test_junk_and_valid_requests_mixed_on_every_way_in(srv: Server, ref: Reference, data: st.DataObject) -> None:
    draw = data.draw
    seq = draw(st.integers(1, 2**64 - 1))
    opened: list[str] = []
    with connect(srv.ws_url) as wj, connect(srv.ws_url, subprotocols=["psn.binary.v1"]) as wb, \
            httpx.Client(base_url=srv.url, timeout=20, headers={"Host": "localhost"}) as c:
        try:
            mixed(draw, ref, c, wj, wb, seq, opened)
        finally:  # shrinking runs this many times: give the slots back
            for sid in opened:
                c.delete(f"/v1/sessions/{sid}")


def mixed(draw: st.DrawFn, ref: Reference, c: httpx.Client, wj, wb, seq: int, opened: list[str]) -> None:
    sessions = {way: Session(ref) for way in ("json", "binary", "http", "oip")}
    for ws in (wj, wb):
        ws.send(json.dumps({"type": "open", "model": MODEL}))
        msg = json.loads(ws.recv(timeout=20))
        assert msg["type"] == "opened", msg
        opened.append(msg["session"]["session_id"])
    r = c.post("/v1/sessions", json={"model": MODEL})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    opened += [sid, f"oip::{MODEL}:{seq}"]
    x0 = fp32_steps(draw, 1)
    r = c.post(f"/v2/models/{MODEL}/infer", json={"inputs": [{"name": "steps", "shape": [1, 1, 3], "datatype": "FP32",
               "data": x0.ravel().tolist()}], "parameters": {"sequence_id": seq, "sequence_start": True}})
    assert r.status_code == 200, r.text
    sessions["oip"].add(x0)
    for _ in range(draw(st.integers(20, 30))):
        way = draw(st.sampled_from(list(sessions)))
        if way in ("json", "binary"):
            ws_burst(draw, wb if way == "binary" else wj, sessions[way], way == "binary")
        elif way == "http":
            http_steps(draw, c, sid, sessions[way])
        else:
            oip(draw, c, seq, sessions[way])
    # after the junk: each session's next step is the one after the last accepted, on the same connections
    for way, ws in (("json", wj), ("binary", wb)):
        ws.send(json.dumps({"type": "steps", "steps": [[0.5, 0.5, 0.5]]}) if way == "json" else
                struct.pack("<IIq", 1, 1, -1) + np.full(3, 0.5, "<f4").tobytes())
        answer = ws.recv(timeout=20)
        index = json.loads(answer)["outputs"][0]["index"] if way == "json" else read_answer(answer)["start"]
        assert index == len(sessions[way].inputs), way
    r = c.post(f"/v1/sessions/{sid}/steps", json={"steps": [[0.5, 0.5, 0.5]]})
    assert r.json()["steps_seen"] == len(sessions["http"].inputs) + 1
    r = c.get(f"/v1/sessions/oip::{MODEL}:{seq}")
    assert r.json()["steps_seen"] == len(sessions["oip"].inputs)
