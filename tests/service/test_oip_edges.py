"""Open Inference Protocol v2 at its edges, against the real service: the exact bounds of what is
accepted (a 256-character sequence id, the largest finite FP32, a header length equal to the body),
what is refused and why (flags that are not JSON booleans, a second input, empty dimensions, binary
sizes that do not match the shape, a batch in a sequence), sequence id 0 and "" as no sequence,
binary outputs chosen per request and per output, the request id echoed, and refusals that carry
Retry-After and are counted. A sweep of one-line mutations of service/frontend/oip.py and
service/frontend/routes/oip.py found each of these let through by the rest of the suite."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import numpy as np
import pytest

from tests.service.conftest import Reference, Server, oip_sequence

URL = "/v2/models/sliding/infer"
STEP = {"name": "steps", "shape": [1, 1, 3], "datatype": "FP32", "data": [0.5, -0.5, 0.25]}
FP32_MAX = float(np.finfo(np.float32).max)


def _batch(x: np.ndarray, **parameters) -> dict:
    """A JSON infer body of a batch ``x`` (B, L, 3) as FP32, with these request parameters."""
    a = np.asarray(x, np.float32)
    body: dict = {"inputs": [{"name": "steps", "shape": list(a.shape), "datatype": "FP32",
                              "data": a.ravel().tolist()}]}
    if parameters:
        body["parameters"] = parameters
    return body


def _refused(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    assert isinstance(msg, str)
    for w in words:
        assert w in msg, (w, msg)
    return msg


def _classify(h: httpx.Client, x: np.ndarray) -> dict:
    """/v1/classify of one sequence (L, 3), the float32 values read as float64: the independent reference."""
    r = h.post("/v1/classify", json={"model": "sliding", "steps": np.asarray(x, np.float32).astype(np.float64)
                                     .tolist()})
    assert r.status_code == 200, r.text
    outs = r.json()["outputs"]
    return {"spikes": [o["spikes"] for o in outs], "scores": [o["scores"] for o in outs],
            "predicted": [o["predicted"] for o in outs]}


def _outputs(r: httpx.Response) -> dict[str, np.ndarray]:
    """Every output of an infer answer as an array of its shape, whether sent as JSON data or as binary."""
    assert r.status_code == 200, r.text
    n = int(r.headers.get("inference-header-content-length", len(r.content)))
    head = json.loads(r.content[:n])
    dtypes = {"UINT8": "<u1", "FP32": "<f4", "INT64": "<i8"}
    out, off = {}, n
    for t in head["outputs"]:
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[t["name"]] = np.asarray(t["data"]).reshape(t["shape"])
        else:
            out[t["name"]] = np.frombuffer(r.content[off:off + size], dtypes[t["datatype"]]).reshape(t["shape"])
            off += size
    assert off == len(r.content)
    return out


def _sent_as(r: httpx.Response) -> dict[str, str]:
    n = int(r.headers.get("inference-header-content-length", len(r.content)))
    return {t["name"]: "binary" if "binary_data_size" in (t.get("parameters") or {}) else "json"
            for t in json.loads(r.content[:n])["outputs"]}


def _assert_like_classify(out: dict[str, np.ndarray], b: int, ref: dict) -> None:
    assert out["spikes"][b].tolist() == ref["spikes"]
    assert out["scores"][b] == pytest.approx(np.asarray(ref["scores"]), rel=1e-6, abs=1e-6)
    assert out["predicted"][b].tolist() == ref["predicted"]


def test_flags_must_be_json_booleans(server: Server, ref: Reference) -> None:
    """1 and 0 are not true and false (Triton's flags are booleans): refused naming the parameter, and a
    refused sequence_start opens nothing."""
    x = ref.sequence("sliding", 2, seed=60).numpy()
    with httpx.Client(base_url=server.url, timeout=20) as h:
        for flag in ("sequence_start", "sequence_end", "binary_data_output"):
            for value in (1, 0, "true"):
                r = h.post(URL, json=oip_sequence(x, 6060, ("scores",), **{flag: value}))
                _refused(r, 422, f"parameters.{flag}", "true or false")
        r = h.post(URL, json=oip_sequence(x, 6060, ("scores",)))  # sequence_start: 1 above opened nothing
        _refused(r, 422, "sequence_start", "not open")


def test_a_misspelt_sequence_parameter_is_refused_and_the_sequence_is_left_as_it_was(server: Server,
                                                                                     ref: Reference) -> None:
    """Free-form parameters are the protocol's, but a misspelt sequence flag ignored would run the steps on
    the wrong state: ``sequence_strat`` meant to start over would append to the open sequence instead."""
    x = ref.sequence("sliding", 4, seed=62).float()
    with httpx.Client(base_url=server.url, timeout=20) as h:
        first = h.post(URL, json=oip_sequence(x[:2].numpy(), 6262, ("spikes",), sequence_start=True))
        for name in ("sequence_strat", "Sequence_Start", "sequence_ends", "sequenceid", "seq_end"):
            r = h.post(URL, json=oip_sequence(x[2:].numpy(), 6262, ("spikes",), **{name: True}))
            _refused(r, 422, f"parameters.{name}", "sequence_start")
        rest = h.post(URL, json=oip_sequence(x[2:].numpy(), 6262, ("spikes",), sequence_end=True,
                                              priority=1, timeout=10_000, my_tag="a"))  # others: free-form
        spikes = np.concatenate([_outputs(first)["spikes"][0], _outputs(rest)["spikes"][0]])
        assert spikes.tolist() == ref.outputs("sliding", x.double())[0]  # refused requests applied nothing


def test_a_256_character_sequence_id_is_a_sequence(server: Server, ref: Reference) -> None:
    x = ref.sequence("sliding", 4, seed=61).float()
    seq = "q" * 256
    with httpx.Client(base_url=server.url, timeout=20) as h:
        first = h.post(URL, json=oip_sequence(x[:2].numpy(), seq, ("spikes",), sequence_start=True))
        rest = h.post(URL, json=oip_sequence(x[2:].numpy(), seq, ("spikes",), sequence_end=True))
        spikes = np.concatenate([_outputs(first)["spikes"][0], _outputs(rest)["spikes"][0]])
        assert spikes.tolist() == ref.outputs("sliding", x.double())[0]
        _refused(h.post(URL, json=oip_sequence(x.numpy(), seq + "q", sequence_start=True)), 422, "at most 256")


@pytest.mark.parametrize("none", [0, ""], ids=["0", "empty"])
def test_sequence_id_0_or_empty_is_no_sequence_a_batch_like_classify(server: Server, ref: Reference,
                                                                     none: int | str) -> None:
    """As in Triton, sequence id 0 (or "") names no sequence: the request is a batch of whole sequences
    (a batch of two is refused only in a sequence), each answered as /v1/classify answers it."""
    x = np.stack([ref.sequence("sliding", 5, seed=s).numpy() for s in (62, 63)]).astype(np.float32)
    with httpx.Client(base_url=server.url, timeout=20) as h:
        out = _outputs(h.post(URL, json=_batch(x, sequence_id=none)))
        assert out["scores"].shape == (2, 5, 4)
        for b in range(2):
            _assert_like_classify(out, b, _classify(h, x[b]))
        _refused(h.post(URL, json=_batch(x, sequence_id=64, sequence_start=True)), 422, "steps", "one sequence")


def test_a_batch_in_a_sequence_is_refused_and_opens_nothing(server: Server, ref: Reference) -> None:
    x = np.stack([ref.sequence("sliding", 3, seed=s).numpy() for s in (64, 65)]).astype(np.float32)
    with httpx.Client(base_url=server.url, timeout=20) as h:
        _refused(h.post(URL, json=_batch(x, sequence_id="pair", sequence_start=True)), 422, "steps", "batch 2")
        _refused(h.post(URL, json=oip_sequence(x[0], "pair")), 422, "sequence_start", "not open")


def test_header_lengths_at_and_past_the_body(server: Server, ref: Reference) -> None:
    x = ref.sequence("sliding", 3, seed=66).numpy().astype(np.float32)[None]
    body = json.dumps(_batch(x)).encode()
    with httpx.Client(base_url=server.url, timeout=20) as h:
        r = h.post(URL, content=body, headers={"Inference-Header-Content-Length": str(len(body))})
        _assert_like_classify(_outputs(r), 0, _classify(h, x[0]))
        for length in (str(len(body) + 1), "9" * 5000):  # past the body; past what int() reads (4300 digits)
            r = h.post(URL, content=body, headers={"Inference-Header-Content-Length": length})
            _refused(r, 422, "Inference-Header-Content-Length")
        r = h.post(URL, content=body, headers={"Inference-Header-Content-Length": "0" * 5000 + str(len(body))})
        _assert_like_classify(_outputs(r), 0, _classify(h, x[0]))  # leading zeros: still the body's length
        r = h.post(URL, content=body + b"\0" * 12, headers={"Inference-Header-Content-Length": str(len(body))})
        msg = _refused(r, 422, "12 bytes of binary data", "no input with binary_data_size")  # none reads them
        assert msg.startswith("Inference-Header-Content-Length: "), msg  # the message names what is at fault


def test_shapes_inputs_and_binary_sizes_that_do_not_fit_are_refused(server: Server) -> None:
    """Each a 422 naming what is wrong, never a 500: an empty batch or sequence, a second input, and a
    binary_data_size that matches the bytes sent but not the shape, or the shape but not the bytes."""
    with httpx.Client(base_url=server.url, timeout=20) as h:
        for shape in ([0, 1, 3], [1, 0, 3], [0, 0, 3]):
            _refused(h.post(URL, json={"inputs": [{**STEP, "shape": shape, "data": []}]}), 422, "steps", "shape")
        _refused(h.post(URL, json={"inputs": [STEP, STEP]}), 422, "inputs", "exactly one")
        _refused(h.post(URL, json={"inputs": [STEP, {**STEP, "name": "more"}]}), 422, "inputs", "'more'")
        for size, sent in ((16, 16), (8, 8), (12, 16), (12, 8)):  # [1, 1, 3] FP32 is 12 bytes
            head = json.dumps({"inputs": [{"name": "steps", "shape": [1, 1, 3], "datatype": "FP32",
                                           "parameters": {"binary_data_size": size}}]}).encode()
            r = h.post(URL, content=head + np.zeros(sent // 4, "<f4").tobytes(),
                       headers={"Inference-Header-Content-Length": str(len(head))})
            _refused(r, 422, "steps", f"binary_data_size {size}", f"{sent} bytes", "needs 12")


def test_fp32_bounds_are_exact(server: Server) -> None:
    """The largest finite FP32 (either sign) runs, as /v1/classify runs it; anything larger in magnitude,
    either sign, is refused as past FP32; Infinity and NaN are refused as not finite."""
    with httpx.Client(base_url=server.url, timeout=20) as h:
        for v in (FP32_MAX, -FP32_MAX):
            x = np.array([[[v, 0.5, -0.5]]], np.float32)
            _assert_like_classify(_outputs(h.post(URL, json=_batch(x))), 0, _classify(h, x[0]))
        for v in (1e39, -1e39, -3.5e38):
            r = h.post(URL, json={"inputs": [{**STEP, "data": [0.0, v, 0.0]}]})
            _refused(r, 422, "steps", "largest finite FP32")
        for raw in ("Infinity", "-Infinity", "NaN"):
            body = json.dumps({"inputs": [STEP]}).replace("0.25", raw)
            r = h.post(URL, content=body, headers={"content-type": "application/json"})
            _refused(r, 422, "steps", "NaN or Inf")


def test_binary_outputs_by_request_and_by_output(server: Server, ref: Reference) -> None:
    """binary_data_output: true sends every output as binary, unless an output's own binary_data says
    otherwise; an output with parameters but no binary_data follows the request. The values are the
    same either way, and as /v1/classify's."""
    x = np.stack([ref.sequence("sliding", 4, seed=s).numpy() for s in (67, 68)]).astype(np.float32)
    with httpx.Client(base_url=server.url, timeout=20) as h:
        refs = [_classify(h, x[b]) for b in range(2)]
        cases = [
            (None, False, dict.fromkeys(("spikes", "scores", "predicted"), "json")),
            (None, True, dict.fromkeys(("spikes", "scores", "predicted"), "binary")),
            ([{"name": "scores", "parameters": {}}, {"name": "predicted", "parameters": {"binary_data": False}},
              {"name": "spikes"}], True, {"scores": "binary", "predicted": "json", "spikes": "binary"}),
            ([{"name": "scores", "parameters": {}}, {"name": "predicted", "parameters": {"binary_data": True}}],
             False, {"scores": "json", "predicted": "binary"}),
        ]
        for outputs, binary, sent in cases:
            body = _batch(x, binary_data_output=binary)
            if outputs is not None:
                body["outputs"] = outputs
            r = h.post(URL, json=body)
            assert _sent_as(r) == sent, r.content[:300]
            out = _outputs(r)
            assert list(out) == list(sent)  # in the order asked for
            for b in range(2):
                for name in out:
                    if name == "scores":
                        assert out[name][b] == pytest.approx(np.asarray(refs[b][name]), rel=1e-6, abs=1e-6)
                    else:
                        assert out[name][b].tolist() == refs[b][name]


def test_the_request_id_is_echoed(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=20) as h:
        for binary in (False, True):
            r = h.post(URL, json={"id": "req-42", "inputs": [STEP], "parameters": {"binary_data_output": binary}})
            n = int(r.headers.get("inference-header-content-length", len(r.content)))
            assert r.status_code == 200 and json.loads(r.content[:n])["id"] == "req-42", r.text
        r = h.post(URL, json={"inputs": [STEP]})
        assert r.status_code == 200 and "id" not in r.json(), r.text


def _errors(h: httpx.Client, code: str) -> float:
    m = re.search(rf'^psn_errors_total\{{code="{code}"\}} (\S+)$', h.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_sequence_past_the_slots_is_told_when_to_retry_and_counted(serve, ref: Reference) -> None:
    """No free slot for a new sequence: 503 with the Retry-After that /v1 gives (the protocol's error body),
    and the refusal counted in psn_errors_total like every other."""
    srv = serve(max_sessions=1)
    x = ref.sequence("sliding", 2, seed=69).numpy()
    with httpx.Client(base_url=srv.url, timeout=20) as h:
        assert h.post(URL, json=oip_sequence(x, 1, ("scores",), sequence_start=True)).status_code == 200
        before = _errors(h, "too_many_sessions")
        r = h.post(URL, json=oip_sequence(x, 2, ("scores",), sequence_start=True))
        _refused(r, 503, "slots")
        assert int(r.headers["Retry-After"]) >= 1
        assert _errors(h, "too_many_sessions") == before + 1
        v1 = h.post("/v1/sessions", json={"model": "sliding"})  # the same refusal through /v1
        assert v1.status_code == 503 and v1.headers["Retry-After"] == r.headers["Retry-After"], v1.text
        before = _errors(h, "invalid_input")
        _refused(h.post(URL, json={"inputs": [{**STEP, "datatype": "INT8"}]}), 422, "FP32")
        assert _errors(h, "invalid_input") == before + 1
        before = _errors(h, "model_not_found")
        _refused(h.get("/v2/models/nope"), 404, "nope")  # metadata of no model
        assert _errors(h, "model_not_found") == before + 1


def test_an_expired_sequence_must_be_started_again(serve, ref: Reference) -> None:
    """A sequence whose idle timeout closed it answers like an ended one: 422, set sequence_start."""
    srv = serve(idle_timeout_s=0.5)
    x = ref.sequence("sliding", 4, seed=70).float()
    with httpx.Client(base_url=srv.url, timeout=20) as h:
        assert h.post(URL, json=oip_sequence(x[:2].numpy(), 5, sequence_start=True)).status_code == 200
        deadline = time.monotonic() + 15
        while (g := h.get("/v1/sessions/oip::sliding:5")).status_code == 200:  # until the engine expired it
            assert time.monotonic() < deadline, g.text
            time.sleep(0.1)
        assert g.json()["error"]["code"] == "session_expired", g.text
        _refused(h.post(URL, json=oip_sequence(x[2:].numpy(), 5)), 422, "sequence_start", "session_expired")
        r = h.post(URL, json=oip_sequence(x.numpy(), 5, ("spikes",), sequence_start=True))  # started again: fresh
        assert _outputs(r)["spikes"][0].tolist() == ref.outputs("sliding", x.double())[0]


def test_readiness_follows_the_engine_core(serve) -> None:
    """/v2/health/ready and /v2/models/{name}/ready are 503 while the engine core does not answer (paused
    here with SIGSTOP), and 200 again once it does."""
    srv = serve()
    with httpx.Client(base_url=srv.url, timeout=20) as h:
        pid = h.get("/healthz").json()["engine_pid"]
        paths = ("/v2/health/ready", "/v2/models/sliding/ready")
        for path in paths:
            r = h.get(path)
            assert r.status_code == 200 and r.json()["ready"] is True, r.text
        os.kill(pid, signal.SIGSTOP)
        try:
            for path in paths:
                r = h.get(path)
                assert r.status_code == 503 and r.json()["ready"] is False, r.text
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 15
        for path in paths:
            while (r := h.get(path)).status_code != 200:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.05)
            assert r.json()["ready"] is True


def test_sequences_start_and_end_under_a_session_queue_of_one(serve, ref: Reference) -> None:
    """PSN_SESSION_QUEUE=1: a sequence_end takes one place in its session's queue (the close it queues is part
    of the request), so a whole sequence in one request (start + end) runs and a sequence can end. Counted
    as two places, every such request was 429 ("0 requests are already waiting"), and a start + end one
    reset the live sequence of its id before it was refused."""
    srv = serve(session_queue=1)
    x = ref.sequence("sliding", 6, seed=71).float()
    want = ref.outputs("sliding", x.double())[0]
    with httpx.Client(base_url=srv.url, timeout=20) as h:
        r = h.post(URL, json=oip_sequence(x.numpy(), 9, ("spikes",), sequence_start=True, sequence_end=True))
        assert _outputs(r)["spikes"][0].tolist() == want
        assert h.get("/v1/sessions/oip::sliding:9").json()["error"]["code"] == "session_closed"
        r = h.post(URL, json=oip_sequence(x[:2].numpy(), 9, ("spikes",), sequence_start=True))
        assert _outputs(r)["spikes"][0].tolist() == want[:2]
        r = h.post(URL, json=oip_sequence(x[2:].numpy(), 9, ("spikes",), sequence_end=True))
        assert _outputs(r)["spikes"][0].tolist() == want[2:]
        assert h.get("/v1/sessions/oip::sliding:9").json()["error"]["code"] == "session_closed"
