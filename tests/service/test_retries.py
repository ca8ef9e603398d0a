"""Retries carry the index of their first step: answered again, never applied twice; gaps are refused."""

from __future__ import annotations

import json

import httpx
import websockets.sync.client as ws_client

from tests.service.conftest import Reference, Server, assert_outputs


def _open(client: httpx.Client, model: str = "sliding") -> str:
    return client.post("/v1/sessions", json={"model": model}).json()["session_id"]


def test_retry_is_not_applied_twice(client: httpx.Client, ref: Reference) -> None:
    x = ref.sequence("sliding", 10, seed=3)
    expect = ref.outputs("sliding", x)
    sid = _open(client)
    url = f"/v1/sessions/{sid}/steps"
    first = client.post(url, json={"start": 0, "steps": x[:4].tolist()}).json()
    again = client.post(url, json={"start": 0, "steps": x[:4].tolist()}).json()  # the same request, retried
    assert again["replayed"] == 4 and again["outputs"] == first["outputs"] and again["steps_seen"] == 4
    # a retry that overlaps: steps 2..3 already applied, 4..6 new
    r = client.post(url, json={"start": 2, "steps": x[2:7].tolist()}).json()
    assert r["start"] == 2 and r["replayed"] == 2 and r["steps_seen"] == 7
    assert_outputs(r["outputs"], expect, start=2)
    r = client.post(url, json={"steps": x[7:].tolist()}).json()  # no start: append
    assert_outputs(r["outputs"], expect, start=7)
    assert client.get(f"/v1/sessions/{sid}").json()["steps_seen"] == 10


def test_gap_is_refused_and_state_kept(client: httpx.Client, ref: Reference) -> None:
    x = ref.sequence("sliding", 6, seed=4)
    sid = _open(client)
    url = f"/v1/sessions/{sid}/steps"
    client.post(url, json={"steps": x[:2].tolist()})
    r = client.post(url, json={"start": 3, "steps": x[3:5].tolist()})
    assert r.status_code == 409 and r.json()["error"]["code"] == "step_gap"
    assert r.json()["error"]["field"] == "start" and "next step is 2" in r.json()["error"]["message"]
    r = client.post(url, json={"start": 2, "steps": x[2:].tolist()})
    assert r.status_code == 200
    assert_outputs(r.json()["outputs"], ref.outputs("sliding", x), start=2)


def test_retry_older_than_the_window_is_refused(serve, ref: Reference) -> None:
    srv = serve(retry_window=3)
    x = ref.sequence("sliding", 8, seed=5)
    with httpx.Client(base_url=srv.url) as c:
        sid = _open(c)
        c.post(f"/v1/sessions/{sid}/steps", json={"steps": x.tolist()})
        r = c.post(f"/v1/sessions/{sid}/steps", json={"start": 4, "steps": x[4:6].tolist()})
        assert r.status_code == 409 and r.json()["error"]["code"] == "retry_too_old"
        r = c.post(f"/v1/sessions/{sid}/steps", json={"start": 5, "steps": x[5:8].tolist()})
        assert r.status_code == 200 and r.json()["replayed"] == 3
        assert_outputs(r.json()["outputs"], ref.outputs("sliding", x), start=5)


def test_ws_retry_and_gap(server: Server, ref: Reference) -> None:
    x = ref.sequence("masked", 8, seed=6)
    expect = ref.outputs("masked", x)
    with ws_client.connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "open", "model": "masked"}))
        json.loads(ws.recv())
        ws.send(json.dumps({"type": "steps", "start": 0, "steps": x[:3].tolist()}))
        a = json.loads(ws.recv())
        ws.send(json.dumps({"type": "steps", "start": 0, "steps": x[:3].tolist()}))
        b = json.loads(ws.recv())
        assert b["replayed"] == 3 and b["outputs"] == a["outputs"]
        ws.send(json.dumps({"type": "steps", "start": 5, "steps": x[5:].tolist(), "id": "g"}))
        err = json.loads(ws.recv())
        assert err["type"] == "error" and err["error"]["code"] == "step_gap" and err["id"] == "g"
        ws.send(json.dumps({"type": "steps", "start": 3, "steps": x[3:].tolist()}))
        c = json.loads(ws.recv())
        assert_outputs(a["outputs"] + c["outputs"], expect)
