"""Many concurrent sessions get exactly the parallel form's outputs: step by step, in chunks, by classify."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import websockets

from tests.service.conftest import Reference, Server, assert_outputs

T = 20


def _chunks(rng: random.Random, n: int, max_len: int) -> list[tuple[int, int]]:
    out, start = [], 0
    while start < n:
        L = rng.randint(1, min(max_len, n - start))
        out.append((start, L))
        start += L
    return out


async def _http_session(c: httpx.AsyncClient, ref: Reference, model: str, seed: int, max_chunk: int) -> None:
    x = ref.sequence(model, T, seed)
    r = await c.post("/v1/sessions", json={"model": model})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    outputs = []
    for start, L in _chunks(random.Random(seed), T, max_chunk):
        r = await c.post(f"/v1/sessions/{sid}/steps", json={"steps": x[start:start + L].tolist()})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["start"] == start and body["steps_seen"] == start + L and body["replayed"] == 0
        outputs += body["outputs"]
    assert_outputs(outputs, ref.outputs(model, x))
    assert (await c.get(f"/v1/sessions/{sid}")).json()["steps_seen"] == T
    assert (await c.delete(f"/v1/sessions/{sid}")).status_code == 204


async def _ws_session(url: str, ref: Reference, model: str, seed: int, max_chunk: int) -> None:
    x = ref.sequence(model, T, seed)
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "open", "model": model}))
        opened = json.loads(await ws.recv())
        assert opened["type"] == "opened" and opened["session"]["model"] == model
        chunks = _chunks(random.Random(seed), T, max_chunk)
        for i, (start, L) in enumerate(chunks):  # pipelined: every message sent before reading answers
            await ws.send(json.dumps({"type": "steps", "steps": x[start:start + L].tolist(), "id": i}))
        outputs = []
        for i, (start, _) in enumerate(chunks):
            msg = json.loads(await ws.recv())
            assert msg["type"] == "steps" and msg["id"] == i and msg["start"] == start, msg
            outputs += msg["outputs"]
        assert_outputs(outputs, ref.outputs(model, x))


def test_concurrent_sessions_equal_parallel_form(server: Server, ref: Reference) -> None:
    """HTTP and WebSocket sessions of several models at once, step by step and in uneven chunks."""

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                     limits=httpx.Limits(max_connections=64)) as c:
            jobs = []
            for i in range(36):
                model = ["sliding", "masked", "conv", "lif"][i % 4]
                max_chunk = 1 if i % 3 == 0 else 6  # some step by step, some in chunks
                if i % 2:
                    jobs.append(_http_session(c, ref, model, seed=100 + i, max_chunk=max_chunk))
                else:
                    jobs.append(_ws_session(server.ws_url, ref, model, seed=100 + i, max_chunk=max_chunk))
            await asyncio.gather(*jobs)

    asyncio.run(main())
    metrics = httpx.get(f"{server.url}/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith('psn_batch_size_sum{model="sliding"}')]
    counts = [line for line in metrics.splitlines() if line.startswith('psn_batch_size_count{model="sliding"}')]
    assert float(sizes[0].split()[-1]) > float(counts[0].split()[-1])  # some batches held several sessions


def test_classify_equals_parallel_form(client: httpx.Client, ref: Reference) -> None:
    for model in ("sliding", "masked", "conv", "lif", "full"):
        T_ = 6 if model == "full" else 12
        x = ref.sequence(model, T_, seed=7)
        r = client.post("/v1/classify", json={"model": model, "steps": x.tolist()})
        assert r.status_code == 200, r.text
        body = r.json()
        spikes, scores = ref.outputs(model, x)
        assert_outputs(body["outputs"], (spikes, scores))
        assert body["scores"] == body["outputs"][-1]["scores"]
        assert body["predicted"] == body["outputs"][-1]["predicted"]  # the class after the last step
        assert body["label"] == ["w", "x", "y", "z"][body["predicted"]]


def test_no_future_leakage(client: httpx.Client, ref: Reference) -> None:
    """The answer for step t does not depend on steps after t: two sessions share a prefix, then differ."""
    a = ref.sequence("sliding", 10, seed=1)
    b = a.clone()
    b[6:] = ref.sequence("sliding", 4, seed=2)
    outs = []
    for x in (a, b):
        sid = client.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        outs.append(client.post(f"/v1/sessions/{sid}/steps", json={"steps": x.tolist()}).json()["outputs"])
    assert outs[0][:6] == outs[1][:6]
    assert_outputs(outs[1], ref.outputs("sliding", b))


def test_classify_takes_inputs_up_to_max_input_and_no_later_input_reaches_an_earlier_step(
        client: httpx.Client, ref: Reference) -> None:
    """A float64 model took any finite float64; 1.79e308 normalised to inf, and in the parallel form's
    ``H = W X`` a 0 weight times inf is NaN at every *earlier* step: /v1/classify's answers for steps
    before a huge input changed (streaming's did not). Inputs past GET /v1/models' max_input are refused;
    at it, the first steps' answers are those of the prefix alone."""
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    for model in ("sliding", "masked", "conv", "lif"):
        top = models[model]["max_input"]
        assert 1e300 < top < 1.7976931348623157e308, (model, top)  # float64 models, small weights
        x = ref.sequence(model, 12, seed=11)
        prefix = client.post("/v1/classify", json={"model": model, "steps": x[:7].tolist()})
        assert prefix.status_code == 200, prefix.text
        for big in (1.7976931348623157e308, -top * 1.0001):
            x[7].view(-1)[0] = big
            r = client.post("/v1/classify", json={"model": model, "steps": x.tolist()})
            assert r.status_code == 422, (model, big, r.text)
            error = r.json()["error"]
            assert error["field"] == "steps" and "max_input" in error["message"], error
        for edge in (top, -top):
            x[7].view(-1)[0] = edge
            r = client.post("/v1/classify", json={"model": model, "steps": x.tolist()})
            assert r.status_code == 200, (model, r.text)
            assert r.json()["outputs"][:7] == prefix.json()["outputs"], model
