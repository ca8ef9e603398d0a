"""Shutdown with work in flight: every pending request is answered or cleanly refused; none hangs."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import websockets

from tests.service.conftest import Reference, assert_outputs


def test_shutdown_answers_or_refuses_pending_work(serve, ref: Reference) -> None:
    srv = serve(max_wait_ms=300, max_batch_size=64)
    x = ref.sequence("sliding", 3, seed=31)
    expect = ref.outputs("sliding", x)

    async def http_one(c: httpx.AsyncClient, sid: str) -> str:
        try:
            r = await c.post(f"/v1/sessions/{sid}/steps", json={"steps": x.tolist()})
        except httpx.TransportError:
            return "refused"  # the listener was already closed
        if r.status_code == 200:
            assert_outputs(r.json()["outputs"], expect)
            return "answered"
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
        return "refused"

    async def ws_one(ready: asyncio.Event) -> str:
        async with websockets.connect(srv.ws_url) as ws:
            await ws.send(json.dumps({"type": "open", "model": "sliding"}))
            json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "steps", "steps": x.tolist()}))
            ready.set()
            try:
                msg = json.loads(await ws.recv())
            except websockets.ConnectionClosed as e:
                assert e.rcvd is None or e.rcvd.code in (1000, 1001, 1012), e
                return "refused"
            if msg["type"] == "steps":
                assert_outputs(msg["outputs"], expect)
                return "answered"
            assert msg["error"]["code"] == "shutting_down", msg
            return "refused"

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
            ids = [(await c.post("/v1/sessions", json={"model": "sliding"})).json()["session_id"] for _ in range(8)]
            ready = asyncio.Event()
            jobs = [asyncio.create_task(http_one(c, i)) for i in ids]
            ws_jobs = [asyncio.create_task(ws_one(ready)) for _ in range(4)]
            await ready.wait()
            await asyncio.sleep(0.05)  # the steps now wait in the batcher (max_wait 300 ms)
            stop = asyncio.create_task(asyncio.to_thread(srv.stop))
            results = await asyncio.wait_for(asyncio.gather(*jobs, *ws_jobs), timeout=20)
            late = await http_one(c, ids[0])  # after shutdown began: refused, not hung
            await stop
            return [*results, late]

    results = asyncio.run(main())
    assert results[-1] == "refused"
    assert results[:8].count("answered") == 8  # HTTP requests already in flight are finished
    assert srv.proc.poll() is not None


def test_after_sigterm_new_connections_are_refused_not_left_hanging(serve) -> None:
    """The supervisor kept its copy of the listening socket open until the engine core had drained: once the front
    ends stopped accepting, the kernel still took new connections into the socket's backlog, where nothing
    answered them, so a /readyz probe (or a client) hung until the service exited. The supervisor now closes its
    copy first: when the front ends have closed theirs, a new connection is refused at once."""
    srv = serve(workers=2, max_wait_ms=6000, max_batch_size=64, drain_timeout_s=10)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        sid = c.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
    answer: list[int] = []

    def in_flight() -> None:  # waits in the batcher for a fuller batch (max_wait 6 s): the front ends drain meanwhile
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            answer.append(c.post(f"/v1/sessions/{sid}/steps", json={"steps": [[0.1, 0.2, 0.3]]}).status_code)

    worker = threading.Thread(target=in_flight)
    worker.start()
    deadline = time.monotonic() + 10
    while httpx.get(f"{srv.url}/metrics").text.count('psn_queue_depth{model="sliding"} 1.0') == 0:
        assert time.monotonic() < deadline, "the steps request never reached the engine core's queue"
        time.sleep(0.02)
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    outcomes: list[str] = []
    while not answer:  # the front ends' drain lasts as long as the request in flight
        try:
            r = httpx.get(f"{srv.url}/readyz", timeout=2, headers={"connection": "close"})
            outcomes.append(f"answered {r.status_code}")
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            outcomes.append("refused")
        except httpx.TimeoutException:
            outcomes.append("hung")
        time.sleep(0.05)
    worker.join()
    assert answer == [200]  # the request in flight is still answered
    assert "hung" not in outcomes and "refused" in outcomes, outcomes
    assert srv.stop() == 0
