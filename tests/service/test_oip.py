"""Open Inference Protocol v2 through tritonclient (its HTTP client, as a user would drive it) against
the real service: health, metadata, and infer with Triton's sequence parameters, binary and JSON
tensors; outputs equal the /v1 streaming and /v1/classify outputs for the same input."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import torch

from tests.service.conftest import Reference, Server, assert_outputs, oip_sequence

tritonclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a dev dependency")


def _client(srv: Server):
    return tritonclient.InferenceServerClient(url=f"127.0.0.1:{srv.port}")


def _infer(c, model: str, x: np.ndarray, binary: bool, **seq):
    inp = tritonclient.InferInput("steps", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.astype(np.float32), binary_data=binary)
    outs = [tritonclient.InferRequestedOutput(n, binary_data=binary) for n in ("spikes", "scores", "predicted")]
    r = c.infer(model, [inp], outputs=outs, **seq)
    return r.as_numpy("spikes"), r.as_numpy("scores"), r.as_numpy("predicted")


def test_health_and_metadata(server: Server) -> None:
    c = _client(server)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("sliding")
    assert not c.is_model_ready("nope")
    meta = c.get_model_metadata("conv")
    assert meta["inputs"] == [{"name": "steps", "datatype": "FP32", "shape": [-1, -1, 2, 5]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("spikes", "UINT8", [-1, -1, 7]), ("scores", "FP32", [-1, -1, 4]), ("predicted", "INT64", [-1, -1])]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_sequences_stream_like_v1_and_stay_independent(server: Server, ref: Reference, binary: bool) -> None:
    c = _client(server)
    xs = {s: ref.sequence("sliding", 9, seed=500 + s).numpy().astype(np.float32) for s in (11, 12)}
    got: dict[int, list] = {11: [], 12: []}
    chunks = [(0, 2), (2, 4), (6, 3)]
    for k, (a, n) in enumerate(chunks):  # two sequences interleaved, request by request
        for s in (11, 12):
            out = _infer(c, "sliding", xs[s][None, a:a + n], binary, sequence_id=s, sequence_start=k == 0,
                         sequence_end=k == len(chunks) - 1)
            assert out[0].shape == (1, n, 6) and out[1].shape == (1, n, 4) and out[2].shape == (1, n)
            got[s].append(out)
    with httpx.Client(base_url=server.url, timeout=20) as h:
        for s in (11, 12):
            spikes = np.concatenate([g[0][0] for g in got[s]])
            scores = np.concatenate([g[1][0] for g in got[s]])
            predicted = np.concatenate([g[2][0] for g in got[s]])
            sid = h.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
            v1 = h.post(f"/v1/sessions/{sid}/steps", json={"steps": xs[s].astype(np.float64).tolist()}).json()
            whole = h.post("/v1/classify", json={"model": "sliding", "steps": xs[s].astype(np.float64).tolist()})
            for o, w in zip(v1["outputs"], whole.json()["outputs"], strict=True):
                t = o["index"]
                assert spikes[t].tolist() == o["spikes"] == w["spikes"]
                assert scores[t].tolist() == pytest.approx(o["scores"], rel=1e-6, abs=1e-6)
                assert predicted[t] == o["predicted"] == w["predicted"]
            expect = ref.outputs("sliding", ref.sequence("sliding", 9, seed=500 + s).float().double())
            assert_outputs(v1["outputs"], expect, rel=1e-6, abs=1e-6)


def test_sequence_reused_after_end_starts_fresh_and_needs_start(server: Server, ref: Reference) -> None:
    c = _client(server)
    x, y = (ref.sequence("sliding", 8, seed=s).float() for s in (3, 4))
    first = _infer(c, "sliding", x.numpy()[None], True, sequence_id="abc", sequence_start=True, sequence_end=True)
    with pytest.raises(tritonclient.InferenceServerException, match="sequence_start"):  # ended: closed
        _infer(c, "sliding", x.numpy()[None], True, sequence_id="abc")
    again = _infer(c, "sliding", y.numpy()[None], True, sequence_id="abc", sequence_start=True)  # reused: fresh
    cont = _infer(c, "sliding", x.numpy()[None], True, sequence_id="abc")  # continues: steps 8..15 after y
    for out, seq, lo in ((first, x, 0), (again, y, 0), (cont, torch.cat([y, x]), 8)):
        spikes, scores = ref.outputs("sliding", seq.double())
        assert out[0][0].tolist() == spikes[lo:lo + 8]
        assert out[1][0] == pytest.approx(np.asarray(scores[lo:lo + 8]), rel=1e-5, abs=1e-5)
    not_reset = ref.outputs("sliding", torch.cat([x, y]).double())[1][8:]
    assert again[1][0] != pytest.approx(np.asarray(not_reset), rel=1e-5, abs=1e-5)  # the test can tell
    with pytest.raises(tritonclient.InferenceServerException, match="sequence_start"):
        _infer(c, "sliding", x.numpy()[None], True, sequence_id="never-started")


def test_integer_and_string_sequence_ids_are_two_sequences(server: Server, ref: Reference) -> None:
    """As in Triton: sequence 4242 and sequence "4242" never share a state; 2**64-1 is a valid id."""
    x, y = (ref.sequence("sliding", 4, seed=s).float().numpy() for s in (31, 32))
    with httpx.Client(base_url=server.url, timeout=20) as h:
        def infer(steps: np.ndarray, seq, **params) -> list:
            r = h.post("/v2/models/sliding/infer", json=oip_sequence(steps, seq, ("spikes",), **params))
            assert r.status_code == 200, r.text
            return r.json()["outputs"][0]["data"]

        infer(x[:2], 4242, sequence_start=True)
        r = h.post("/v2/models/sliding/infer", json=oip_sequence(x[2:], "4242"))
        assert r.status_code == 422 and "sequence_start" in r.json()["error"], r.text  # "4242" was never started
        assert infer(y, "4242", sequence_start=True) == np.ravel(ref.outputs("sliding", torch.tensor(y).double())[0]
                                                                 ).tolist()
        assert infer(x[2:], 4242) == np.ravel(ref.outputs("sliding", torch.tensor(x).double())[0][2:]).tolist()
        assert h.get("/v1/sessions/oip::sliding:4242").json()["steps_seen"] == 4
        assert h.get('/v1/sessions/oip::sliding:"4242"').json()["steps_seen"] == 4
        infer(x[:1], 2**64 - 1, sequence_start=True, sequence_end=True)


def test_an_end_racing_a_new_start_is_one_or_the_other(server: Server, ref: Reference) -> None:
    """Client A ends sequence 77 while client B starts it again, at the same moment, 12 times. Each request is
    one engine operation, so the outcome is one of the two orders: A's end first (B's run stays open and
    continues), or B's start first (A's steps and end apply to B's run). With separate open, steps and
    close calls, B's start could be answered on top of A's steps, or refused as not open although it set
    sequence_start, and A's end could close B's run without A's steps in it."""
    x, y = (ref.sequence("sliding", 4, seed=s).float().numpy() for s in (41, 42))
    fresh = ref.outputs("sliding", torch.tensor(y).double())[1]
    a_on_b = ref.outputs("sliding", torch.tensor(np.concatenate([y[:2], x[2:]])).double())[1][2:]
    a_own = ref.outputs("sliding", torch.tensor(x).double())[1][2:]

    async def main() -> list[tuple[httpx.Response, ...]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as a, \
                httpx.AsyncClient(base_url=server.url, timeout=20) as b:
            async def infer(c: httpx.AsyncClient, steps: np.ndarray, **params) -> httpx.Response:
                return await c.post("/v2/models/sliding/infer", json=oip_sequence(steps, 77, ("scores",), **params))

            seen = []
            for _ in range(12):
                assert (await infer(a, x[:2], sequence_start=True)).status_code == 200
                ended, started = await asyncio.gather(infer(a, x[2:], sequence_end=True),
                                                      infer(b, y[:2], sequence_start=True))
                if started.status_code == 409:  # busy: A's end was still queued; B starts again now
                    started = await infer(b, y[:2], sequence_start=True)
                seen.append((ended, started, await infer(b, y[2:], sequence_end=True)))
            return seen

    def scores(r: httpx.Response) -> list[float]:
        assert r.status_code == 200, r.text
        return r.json()["outputs"][0]["data"]

    for ended, started, cont in asyncio.run(main()):
        assert scores(started) == pytest.approx(np.ravel(fresh[:2]), rel=1e-5, abs=1e-6)  # from a fresh state
        if cont.status_code == 200:  # A's end came first, on A's own run
            assert scores(ended) == pytest.approx(np.ravel(a_own), rel=1e-5, abs=1e-6)
            assert scores(cont) == pytest.approx(np.ravel(fresh[2:]), rel=1e-5, abs=1e-6)
        else:  # B's start came first: A's steps ran on B's run, and A's end ended it
            assert cont.status_code == 422 and "session_closed" in cont.text, cont.text
            assert scores(ended) == pytest.approx(np.ravel(a_on_b), rel=1e-5, abs=1e-6)


def test_plain_infer_is_classify_over_a_batch(server: Server, ref: Reference) -> None:
    c = _client(server)
    x = np.stack([ref.sequence("masked", 6, seed=s).numpy() for s in (1, 2, 3)]).astype(np.float32)  # [3, 6, 3]
    spikes, scores, predicted = _infer(c, "masked", x, True)
    assert spikes.shape == (3, 6, 8) and scores.shape == (3, 6, 4)
    for b in range(3):
        exp_spikes, exp_scores = ref.outputs("masked", ref.sequence("masked", 6, seed=b + 1).float().double())
        assert spikes[b].tolist() == exp_spikes
        assert scores[b] == pytest.approx(np.asarray(exp_scores), rel=1e-5, abs=1e-5)
        assert predicted[b].tolist() == np.asarray(exp_scores).argmax(-1).tolist()


def test_protocol_errors(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=20) as h:
        bad = [({"inputs": [{"name": "x", "shape": [1, 1, 3], "datatype": "FP32", "data": [0, 0, 0]}]}, "steps"),
               ({"inputs": [{"name": "steps", "shape": [1, 1, 2], "datatype": "FP32", "data": [0, 0]}]}, "[B, L, 3]"),
               ({"inputs": [{"name": "steps", "shape": [1, 1, 3], "datatype": "FP32", "data": [0, 1e39, 0]}]},
                "FP32"),
               ({"inputs": [{"name": "steps", "shape": [1, 1, 3], "datatype": "INT8", "data": [0, 1, 0]}]}, "FP32")]
        step = {"name": "steps", "shape": [1, 1, 3], "datatype": "FP32", "data": [0, 0, 0]}
        for seq in (True, False, 1.5, [1], {"id": 1}):  # strict: false is not "no sequence", true not sequence 1
            bad.append(({"inputs": [step], "parameters": {"sequence_id": seq, "sequence_start": True}},
                        "sequence_id: expected an integer or a string"))
        def data(values: list) -> dict:
            return {"inputs": [{**step, "data": values}]}

        bad += [(data([0, 10**400, 0]), "too large for any float"),  # a JSON integer past every float: not 500
                (data(["0.5", 0, 0]), "expected numbers"), (data([True, False, True]), "booleans"),
                (data([0.5, True, 0.5]), "boolean"),
                (data([None, 0, 0]), "null"), (data([0, 0]), "2 values for shape")]
        for flag in ("sequence_start", "sequence_end", "binary_data_output"):  # "false" is a string, not false
            bad.append(({**data([0, 0, 0]), "parameters": {"sequence_id": 5, flag: "false"}}, f"parameters.{flag}"))
        bad.append(({**data([0, 0, 0]), "outputs": [{"name": "spikes"}, {"name": "nope"}]}, "no output named 'nope'"))
        bad.append(({**data([0, 0, 0]), "outputs": [{"name": "scores"}, {"name": "scores"}]}, "asked for twice"))
        for size in (True, "1", 1.0):  # strict: pydantic would read each as 1
            bad.append(({"inputs": [{**step, "shape": [size, 1, 3]}]}, "shape"))
        for seq, words in ((-1, "unsigned 64-bit"), (2**64, "unsigned 64-bit"), ("s" * 257, "at most 256")):
            bad.append(({"inputs": [step], "parameters": {"sequence_id": seq, "sequence_start": True}}, words))
        for body, words in bad:
            r = h.post("/v2/models/sliding/infer", json=body)
            assert r.status_code == 422 and words in r.json()["error"], r.text
        r = h.post("/v2/models/sliding/infer", json=data([2**64, 0, 0]))  # a 65-bit integer is a fine FP32
        assert r.status_code == 200, r.text
        r = h.post("/v2/models/nope/infer", json=bad[0][0])
        assert r.status_code == 404 and "nope" in r.json()["error"]
        for shape in ([1, 65, 3], [65, 1, 3], [9, 8, 3]):  # PSN_MAX_STEPS_PER_REQUEST=64 counts B x L steps
            r = h.post("/v2/models/sliding/infer", json={"inputs": [{**step, "shape": shape,
                                                                      "data": [0] * (3 * shape[0] * shape[1])}]})
            assert r.status_code == 413 and "at most 64" in r.json()["error"], r.text
        r = h.post("/v2/models/sliding/infer", json={"inputs": [{**step, "shape": [8, 8, 3], "data": [0] * 192}]})
        assert r.status_code == 200, r.text
        head = json.dumps(data([0, 0, 0])).encode()  # JSON data, then bytes nothing reads
        r = h.post("/v2/models/sliding/infer", content=head + b"\0" * 12,
                   headers={"Inference-Header-Content-Length": str(len(head))})
        assert r.status_code == 422 and "12 bytes of binary data" in r.json()["error"], r.text
        head = json.dumps({"inputs": [{**step, "parameters": {"binary_data_size": 12}}]}).encode()  # data and size
        r = h.post("/v2/models/sliding/infer", content=head + b"\0" * 12,
                   headers={"Inference-Header-Content-Length": str(len(head))})
        assert r.status_code == 422 and "both data and binary_data_size" in r.json()["error"], r.text
        r = h.post("/v2/models/sliding/infer", content=head.replace(b'"data": [0, 0, 0], ', b"") + b"\0" * 12,
                   headers={"Inference-Header-Content-Length": str(len(head) - len(b'"data": [0, 0, 0], '))})
        assert r.status_code == 200, r.text  # the same without data
        # a header length that str.isdigit() takes for a number ("²") but int() does not
        r = h.post("/v2/models/sliding/infer", content=b'{"inputs": []}',
                   headers={"Inference-Header-Content-Length": b"\xb2"})
        assert r.status_code == 422 and "Inference-Header-Content-Length" in r.json()["error"], r.text


def test_every_refusal_under_v2_has_the_protocols_error_shape(server: Server) -> None:
    """Refusals made before any OIP route runs (unknown path, method, body or head too large) are the
    protocol's ``{"error": "message"}`` under /v2, as tritonclient reads them; /v1 keeps its object."""
    with httpx.Client(base_url=server.url, timeout=20) as h:
        answers = {404: h.get("/v2/models/sliding/nope"), 405: h.get("/v2/models/sliding/infer"),
                   413: h.post("/v2/models/sliding/infer", content=b"x" * (2 << 20)),
                   431: h.get("/v2/models/sliding", headers={"x-big": "y" * (64 << 10)})}
        for status, r in answers.items():
            assert r.status_code == status and isinstance(r.json()["error"], str), r.text
        r = h.get("/v1/models/nope/x")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_a_refused_sequence_request_leaves_the_sequence_as_it_was(server: Server, ref: Reference) -> None:
    """Refusals that are only known once the request is read (an unknown output, sequence_start past a
    masked model's horizon) come before the sequence is touched: no steps applied, no restart, no close."""
    x = ref.sequence("masked", 8, seed=31).numpy().astype(np.float32)

    def infer(h: httpx.Client, steps: np.ndarray, outputs: tuple[str, ...] = ("scores",), **params) -> httpx.Response:
        return h.post("/v2/models/masked/infer", json=oip_sequence(steps, "keep", outputs, **params))

    with httpx.Client(base_url=server.url, timeout=20) as h:
        assert infer(h, x[:3], sequence_start=True).status_code == 200
        r = infer(h, x[3:5], ("scores", "nope"))
        assert r.status_code == 422 and "nope" in r.json()["error"], r.text
        r = infer(h, x[3:5], ("nope",), sequence_end=True)
        assert r.status_code == 422, r.text
        r = infer(h, np.zeros((25, 3), np.float32), sequence_start=True)  # masked T=24: refused, not restarted
        assert r.status_code == 422 and "T=24" in r.json()["error"], r.text
        r = infer(h, x[3:], sequence_end=True)  # steps 3..7 of the one sequence, as if nothing had come between
        assert r.status_code == 200, r.text
    expect = np.asarray(ref.outputs("masked", torch.from_numpy(x).double())[1])
    assert np.asarray(r.json()["outputs"][0]["data"]).reshape(5, 4) == pytest.approx(expect[3:], rel=1e-5, abs=1e-5)


def test_a_sequence_end_whose_steps_are_refused_does_not_end_the_sequence(server: Server, ref: Reference) -> None:
    """An end whose steps the engine core refuses when it schedules them (past a masked model's horizon) is
    refused whole: the close queued behind those steps must not run, so the client can send the steps that
    fit, with the end, and get them answered (it was told 'not open' instead)."""
    x = ref.sequence("masked", 24, seed=37).numpy().astype(np.float32)
    too_many = np.zeros((6, 3), np.float32)

    def infer(h: httpx.Client, steps: np.ndarray, **params) -> httpx.Response:
        return h.post("/v2/models/masked/infer", json=oip_sequence(steps, "refused-end", ("scores",), **params))

    with httpx.Client(base_url=server.url, timeout=20) as h:
        assert infer(h, x[:20], sequence_start=True).status_code == 200
        r = infer(h, too_many, sequence_end=True)  # masked T=24: 4 more fit, not 6
        assert r.status_code == 422 and "at most 4 more fit" in r.json()["error"], r.text
        end = infer(h, x[20:], sequence_end=True)  # steps 20..23 of the one sequence, as if nothing came between
        assert end.status_code == 200, end.text
        r = infer(h, x[:1])
        assert r.status_code == 422 and "not open" in r.json()["error"], r.text  # this end did close it
    expect = np.asarray(ref.outputs("masked", torch.from_numpy(x).double())[1])
    assert np.asarray(end.json()["outputs"][0]["data"]).reshape(4, 4) == pytest.approx(expect[20:], rel=1e-5,
                                                                                         abs=1e-5)


def test_binary_outputs_travel_as_bytes_after_the_json_header(server: Server, ref: Reference) -> None:
    x = ref.sequence("sliding", 3, seed=9).numpy().astype("<f4")
    head = (b'{"inputs":[{"name":"steps","shape":[1,3,3],"datatype":"FP32","parameters":{"binary_data_size":36}}],'
            b'"outputs":[{"name":"scores","parameters":{"binary_data":true}},{"name":"predicted"}]}')
    with httpx.Client(base_url=server.url, timeout=20) as h:
        r = h.post("/v2/models/sliding/infer", content=head + x.tobytes(),
                   headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    meta = httpx.Response(200, content=r.content[:n]).json()
    scores_meta, predicted_meta = meta["outputs"]
    assert scores_meta["parameters"]["binary_data_size"] == 3 * 4 * 4 == len(r.content) - n
    scores = np.frombuffer(r.content[n:], "<f4").reshape(1, 3, 4)
    expect = ref.outputs("sliding", ref.sequence("sliding", 3, seed=9).float().double())[1]
    assert scores[0] == pytest.approx(np.asarray(expect), rel=1e-5, abs=1e-5)
    assert predicted_meta["data"] == np.asarray(expect).argmax(-1).tolist()  # JSON, as asked


def test_restarting_a_sequence_reuses_its_slot(serve, ref: Reference) -> None:
    srv = serve(max_sessions=2)
    c = _client(srv)
    x = ref.sequence("sliding", 2, seed=5).numpy().astype(np.float32)[None]
    for _ in range(4):  # more restarts than slots: each start frees the sequence's old session first
        _infer(c, "sliding", x, True, sequence_id=7, sequence_start=True)
    _infer(c, "sliding", x, True, sequence_id=8, sequence_start=True)  # the second slot is still free


def test_restarting_a_live_sequence_forgets_no_ended_id(serve, ref: Reference) -> None:
    """A sequence_start on a live sequence closes its old run and opens the id again at once: the id is live,
    not ended, so PSN_REMEMBER_GONE must not lose a place to it. The old run's end used to be remembered first,
    and with the table full that pushed out the oldest ended id (its owner got 404, as for an id that never
    existed, where docs/api.md promises 410 until more ids than PSN_REMEMBER_GONE have ended), then the id was
    forgotten again on the open."""
    srv = serve(remember_gone=2)
    x = ref.sequence("sliding", 2, seed=9).tolist()
    with httpx.Client(base_url=srv.url, timeout=20) as c:
        ended = []
        for _ in range(2):  # the table is full: two closed ids
            sid = c.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
            assert c.delete(f"/v1/sessions/{sid}").status_code == 204
            ended.append(sid)
        for _ in range(3):  # sequence 7 started, then started over twice while live
            r = c.post("/v2/models/sliding/infer", json=oip_sequence(x, 7, sequence_start=True))
            assert r.status_code == 200, r.text
        for sid in ended:
            r = c.get(f"/v1/sessions/{sid}")
            assert r.status_code == 410 and r.json()["error"]["code"] == "session_closed", (sid, r.text)
        r = c.post("/v2/models/sliding/infer", json=oip_sequence(x, 7))  # and the sequence is live
        assert r.status_code == 200, r.text
