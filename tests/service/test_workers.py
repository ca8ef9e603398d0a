"""Front ends and the engine core as separate processes: sessions shared across front-end workers,
concurrent writers serialised, a killed front end loses no session, a killed engine core answers 503
(never a hang) and comes back."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import ExitStack

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.service.conftest import Reference, Server, assert_outputs


def on_workers(srv: Server, want: set[int], stack: ExitStack, limit: int = 64) -> dict[int, ClientConnection]:
    """Open WebSockets until one has landed on each worker in ``want`` (the kernel picks the worker)."""
    found: dict[int, ClientConnection] = {}
    for _ in range(limit):
        with ExitStack() as attempt:
            ws = attempt.enter_context(connect(srv.ws_url))
            w = int(ws.response.headers["x-psn-worker"])
            if w in want and w not in found:
                found[w] = ws
                stack.push(attempt.pop_all())
                if set(found) == want:
                    break
    assert set(found) == want, f"could not reach workers {want - set(found)} in {limit} connections"
    return found


def ask(ws: ClientConnection, msg: dict) -> dict:
    ws.send(json.dumps(msg))
    return json.loads(ws.recv())


def test_sessions_are_shared_and_writers_serialised_across_workers(serve, ref: Reference) -> None:
    srv = serve(workers=2)
    with ExitStack() as stack:
        _shared_and_serialised(on_workers(srv, {0, 1}, stack), ref)


def _shared_and_serialised(conns: dict[int, ClientConnection], ref: Reference) -> None:
    x = ref.sequence("sliding", 24, seed=80)
    sid = ask(conns[0], {"type": "open", "model": "sliding"})["session"]["session_id"]
    assert ask(conns[1], {"type": "attach", "session_id": sid})["session"]["steps_seen"] == 0
    # alternate writers on the two workers, each continuing where the other stopped
    outputs = []
    for i in range(4):
        ans = ask(conns[i % 2], {"type": "steps", "steps": x[2 * i:2 * i + 2].tolist()})
        assert ans["start"] == 2 * i, ans
        outputs += ans["outputs"]
    assert_outputs(outputs, ref.outputs("sliding", x[:8]))
    # concurrent writers appending 1-step requests: every step is applied once, in some order
    rows = {0: x[8:16], 1: x[16:24]}
    answers: dict[int, list[dict]] = {0: [], 1: []}

    def writer(w: int) -> None:
        for row in rows[w]:
            answers[w].append(ask(conns[w], {"type": "steps", "steps": [row.tolist()]}))

    threads = [threading.Thread(target=writer, args=(w,)) for w in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    starts = sorted(a["start"] for w in (0, 1) for a in answers[w])
    assert starts == list(range(8, 24)), starts  # each index answered exactly once
    applied = x.clone()  # the inputs in the order the engine core applied them
    for w in (0, 1):
        for j, a in enumerate(answers[w]):
            applied[a["start"]] = rows[w][j]
    expect = ref.outputs("sliding", applied)
    for w in (0, 1):
        for a in answers[w]:
            assert_outputs(a["outputs"], expect, start=a["start"])


def test_killing_a_frontend_loses_no_session(serve, ref: Reference) -> None:
    srv = serve(workers=2)
    pids = srv.worker_pids()
    with ExitStack() as stack:
        _kill_one(srv, pids, on_workers(srv, {0, 1}, stack), ref)
    # the supervisor has started a new worker 0
    deadline = time.monotonic() + 30
    while srv.worker_pids().get(0) in (None, pids[0]):
        assert time.monotonic() < deadline, srv.log()
    assert "front end 0 (pid" in srv.log() and "restarting it" in srv.log()


def _kill_one(srv: Server, pids: dict[int, int], conns: dict[int, ClientConnection], ref: Reference) -> None:
    x = {w: ref.sequence("sliding", 12, seed=90 + w) for w in (0, 1)}
    sids = {w: ask(conns[w], {"type": "open", "model": "sliding"})["session"]["session_id"] for w in (0, 1)}
    outs: dict[int, list] = {0: [], 1: []}
    for w in (0, 1):
        outs[w] += ask(conns[w], {"type": "steps", "steps": x[w][:6].tolist()})["outputs"]
    os.kill(pids[0], signal.SIGKILL)
    with pytest.raises(ConnectionClosed):  # worker 0's client loses its connection ...
        ask(conns[0], {"type": "steps", "steps": x[0][6:9].tolist()})
    # ... worker 1's client sees nothing
    outs[1] += ask(conns[1], {"type": "steps", "steps": x[1][6:].tolist()})["outputs"]
    assert_outputs(outs[1], ref.outputs("sliding", x[1]))
    # worker 0's client reconnects (to whichever worker), attaches, re-sends from its last acknowledged step
    with connect(srv.ws_url) as ws:
        info = ask(ws, {"type": "attach", "session_id": sids[0]})["session"]
        assert info["steps_seen"] in (6, 9)  # the lost request may or may not have reached the engine core
        ans = ask(ws, {"type": "steps", "start": 6, "steps": x[0][6:].tolist()})
        assert ans["start"] == 6 and ans["replayed"] == info["steps_seen"] - 6
        outs[0] += ans["outputs"]
    assert_outputs(outs[0], ref.outputs("sliding", x[0]))


def test_engine_core_crash_answers_503_then_recovers(serve, ref: Reference) -> None:
    srv = serve(max_wait_ms=5000, max_batch_size=64)  # a request waits 5 s for a fuller batch
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        engine_pid = c.get("/healthz").json()["engine_pid"]
        sid = c.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        result: dict = {}

        def pending() -> None:
            t0 = time.monotonic()
            r = c.post(f"/v1/sessions/{sid}/steps", json={"steps": ref.sequence("sliding", 2, seed=1).tolist()})
            result.update(status=r.status_code, body=r.json(), seconds=time.monotonic() - t0)

        th = threading.Thread(target=pending)
        th.start()
        time.sleep(0.5)  # the request now waits in the engine core
        os.kill(engine_pid, signal.SIGKILL)
        th.join(10)
        assert not th.is_alive(), "the pending request hung"
        assert result["status"] == 503 and result["body"]["error"]["code"] == "engine_unavailable", result
        assert result["seconds"] < 4  # answered when the engine core died, not when the batch was due
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:  # 503 until the supervisor's new engine core is up
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        assert c.get("/healthz").json()["engine_pid"] not in (None, engine_pid)
        r = c.post(f"/v1/sessions/{sid}/steps", json={"steps": [[0.0, 0.0, 0.0]]})
        assert r.status_code == 410 and r.json()["error"]["code"] == "session_lost"  # died with the engine (no store)
        sid = c.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        x = ref.sequence("sliding", 3, seed=2)
        r = c.post(f"/v1/sessions/{sid}/steps", json={"steps": x.tolist()})
        assert r.status_code == 200
        assert_outputs(r.json()["outputs"], ref.outputs("sliding", x))
    assert "the engine core (pid" in srv.log()


def test_a_front_end_that_dies_while_the_engine_core_restarts_is_restarted_at_once(serve) -> None:
    """The supervisor restarts a dead front end while it waits for a new engine core (seconds: torch's
    import), not after: with one worker, nothing else answers /healthz meanwhile."""
    srv = serve()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        h = c.get("/healthz").json()
        os.kill(h["engine_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while f"the engine core (pid {h['engine_pid']}) exited" not in srv.log():  # it is starting a new one
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.02)
        os.kill(h["pid"], signal.SIGKILL)
        while not _ready(c):
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
    log = srv.log()
    restarted = log.index(f"front end 0 (pid {h['pid']}) exited")
    assert restarted < log.index("engine core ready", log.index(f"the engine core (pid {h['engine_pid']}) exited")), \
        log


def _ready(c: httpx.Client) -> bool:
    try:
        return c.get("/readyz", headers={"connection": "close"}, timeout=1).status_code == 200
    except httpx.TransportError:  # no front end yet
        return False
