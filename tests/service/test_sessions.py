"""Session life cycle: idle expiry (410 vs 404), WebSocket told of expiry, slot reuse, session limit."""

from __future__ import annotations

import json
import time

import httpx
import websockets.sync.client as ws_client

from tests.service.conftest import Reference, assert_outputs


def test_expiry_slot_reuse_and_limit(serve, ref: Reference) -> None:
    srv = serve(max_sessions=2, idle_timeout_s=0.6)
    x = ref.sequence("sliding", 5, seed=11)
    with httpx.Client(base_url=srv.url) as c:
        ids = [c.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"] for _ in range(2)]
        for sid in ids:  # leave state in both slots
            assert c.post(f"/v1/sessions/{sid}/steps", json={"steps": x.tolist()}).status_code == 200
        r = c.post("/v1/sessions", json={"model": "sliding"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_sessions"
        assert int(r.headers["Retry-After"]) >= 1
        # other models have their own slots
        assert c.post("/v1/sessions", json={"model": "masked"}).status_code == 201
        time.sleep(1.8)
        for sid in ids:
            r = c.get(f"/v1/sessions/{sid}")
            assert r.status_code == 410 and r.json()["error"]["code"] == "session_expired"
            r = c.post(f"/v1/sessions/{sid}/steps", json={"steps": x.tolist()})
            assert r.status_code == 410 and r.json()["error"]["code"] == "session_expired"
        r = c.get("/v1/sessions/never-existed")
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
        # the freed slots are reused and start from a clean state
        new = [c.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"] for _ in range(2)]
        for sid in new:
            r = c.post(f"/v1/sessions/{sid}/steps", json={"steps": x.tolist()})
            assert_outputs(r.json()["outputs"], ref.outputs("sliding", x))
        assert "psn_sessions_expired_total" in c.get("/metrics").text


def test_delete_frees_the_slot(serve, ref: Reference) -> None:
    srv = serve(max_sessions=1)
    with httpx.Client(base_url=srv.url) as c:
        sid = c.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        r = c.get(f"/v1/sessions/{sid}")
        assert r.status_code == 410 and r.json()["error"]["code"] == "session_closed"
        assert c.delete(f"/v1/sessions/{sid}").status_code == 410
        assert c.post("/v1/sessions", json={"model": "sliding"}).status_code == 201


def test_ws_is_told_when_its_session_expires(serve, ref: Reference) -> None:
    srv = serve(idle_timeout_s=0.5)
    x = ref.sequence("sliding", 4, seed=12)
    with ws_client.connect(srv.ws_url) as ws:
        ws.send(json.dumps({"type": "open", "model": "sliding"}))
        sid = json.loads(ws.recv())["session"]["session_id"]
        msg = json.loads(ws.recv(timeout=5))
        assert msg["type"] == "expired" and msg["session_id"] == sid
        assert msg["error"]["code"] == "session_expired" and msg["error"]["field"] == "session_id", msg
        assert sid in msg["error"]["message"]
        ws.send(json.dumps({"type": "steps", "steps": x.tolist()}))
        err = json.loads(ws.recv(timeout=5))
        assert err["type"] == "error" and err["error"]["code"] == "session_expired"
        ws.send(json.dumps({"type": "attach", "session_id": sid}))
        err = json.loads(ws.recv(timeout=5))
        assert err["error"]["code"] == "session_expired"
        ws.send(json.dumps({"type": "open", "model": "sliding"}))  # the connection is still usable
        assert json.loads(ws.recv(timeout=5))["type"] == "opened"
        ws.send(json.dumps({"type": "steps", "steps": x.tolist()}))
        assert_outputs(json.loads(ws.recv(timeout=5))["outputs"], ref.outputs("sliding", x))


def test_ws_attach_continues_an_http_session(serve, ref: Reference) -> None:
    srv = serve()
    x = ref.sequence("conv", 6, seed=13)
    with httpx.Client(base_url=srv.url) as c:
        sid = c.post("/v1/sessions", json={"model": "conv"}).json()["session_id"]
        first = c.post(f"/v1/sessions/{sid}/steps", json={"steps": x[:2].tolist()}).json()["outputs"]
    with ws_client.connect(srv.ws_url) as ws:
        ws.send(json.dumps({"type": "attach", "session_id": sid}))
        att = json.loads(ws.recv())
        assert att["type"] == "attached" and att["session"]["steps_seen"] == 2
        ws.send(json.dumps({"type": "steps", "steps": x[2:].tolist()}))
        rest = json.loads(ws.recv())["outputs"]
        assert_outputs(first + rest, ref.outputs("conv", x))
        ws.send(json.dumps({"type": "close"}))
        assert json.loads(ws.recv()) == {"type": "closed", "session_id": sid}
