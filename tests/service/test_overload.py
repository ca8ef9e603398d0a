"""Regressions found by the overload benchmark (bench/overload.py, BENCHMARKS.md): what a flood of HTTP
requests costs each front end, and HTTP clients that never read their answers."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import select
import signal
import socket
import time
from pathlib import Path

import httpx
from fastapi.routing import APIRoute

from model.network import LayerConfig
from service.config import Settings
from service.frontend.app import create_app
from service.frontend.limits import SlowReaders
from tests.service.conftest import Server, make_model


def _api_routes(routes) -> list[APIRoute]:
    """Every APIRoute, included routers opened (FastAPI 0.165 keeps them as lazy ``_IncludedRouter``s)."""
    out = []
    for r in routes:
        if isinstance(r, APIRoute):
            out.append(r)
        elif (inner := getattr(r, "original_router", None)) is not None:
            out += _api_routes(inner.routes)
    return out


def _dependency_calls(dependant) -> list:
    out = []
    for dep in dependant.dependencies:
        out += [dep.call, *_dependency_calls(dep)]
    return out


def test_no_route_runs_a_plain_function_in_the_thread_pool() -> None:
    """FastAPI runs a plain ``def`` endpoint or dependency in its thread pool: a thread hop per request."""
    app = create_app(Settings(), "unix:/nonexistent")
    routes = _api_routes(app.routes)
    assert {"/v1/sessions/{session_id}/steps", "/v1/classify", "/v2/models/{name}/infer"} <= {r.path for r in routes}
    sync = [f"{route.path}: {getattr(call, '__qualname__', call)}" for route in routes
            for call in (route.endpoint, *_dependency_calls(route.dependant))
            if call is not None and not inspect.iscoroutinefunction(call)]
    assert not sync, sync


def test_http_requests_start_no_threads_in_the_front_end(serve) -> None:
    """The front end serves the /v1 and /v2 HTTP routes on its event loop alone: no worker thread appears
    however many requests run at once (the session dependency used to take one of up to 40 pool threads
    per request: about 50 us of front-end CPU per request, and GIL contention under a flood)."""
    srv: Server = serve()
    pid = httpx.get(f"{srv.url}/healthz").json()["pid"]
    tasks = Path(f"/proc/{pid}/task")
    before = len(list(tasks.iterdir()))

    async def load() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
            sid = (await c.post("/v1/sessions", json={"model": "sliding"})).json()["session_id"]
            calls = [c.post(f"/v1/sessions/{sid}/steps", json={"steps": [[0.5, 0.5, 0.5]]}) for _ in range(24)]
            calls += [c.get(f"/v1/sessions/{sid}") for _ in range(8)]
            calls += [c.get("/v1/models"), c.get("/v1/models/sliding"), c.get("/v2/models/sliding"),
                      c.get("/v2/health/ready"), c.get("/v2/models/sliding/ready"),
                      c.post("/v1/classify", json={"model": "sliding", "steps": [[0.5, 0.5, 0.5]]})]
            rs = await asyncio.gather(*calls)
            assert all(r.status_code in (200, 429) for r in rs), [r.text for r in rs if r.status_code >= 400]
            assert (await c.delete(f"/v1/sessions/{sid}")).status_code == 204

    asyncio.run(load())
    assert len(list(tasks.iterdir())) == before


def _never_reading_client(srv: Server, requests: list[bytes]) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up soon
    sock.connect(("127.0.0.1", srv.port))
    sock.settimeout(10)
    with contextlib.suppress(TimeoutError):  # the server stops reading once its answers stop fitting
        sock.sendall(b"".join(requests))
    return sock


def _steps_request(sid: str, steps: int) -> bytes:
    body = json.dumps({"steps": [[0.5, -0.5, 0.25]] * steps}).encode()
    return (f"POST /v1/sessions/{sid}/steps HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def _reset(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLERR | select.POLLHUP)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def test_http_clients_that_pipeline_and_never_read_are_dropped(serve) -> None:
    """Two clients pipeline 48 requests with 133 kB answers each and read none: each one's request stuck in
    a send held one of the two connection slots for ever (uvicorn has no write timeout), so the front end
    refused everyone else with 503. Now each is reset ``PSN_WS_SEND_TIMEOUT_S`` after its bytes stop moving."""
    srv = serve(max_connections=2, ws_send_timeout_s=1)
    sids = [httpx.post(f"{srv.url}/v1/sessions", json={"model": "sliding"}).json()["session_id"] for _ in range(2)]
    socks = [_never_reading_client(srv, [_steps_request(sid, 1024)] * 48) for sid in sids]
    try:
        deadline = time.monotonic() + 20
        while not all(_reset(s) for s in socks):
            assert time.monotonic() < deadline, "the server kept HTTP clients that do not read"
            time.sleep(0.1)
        r = httpx.get(f"{srv.url}/v1/sessions/{sids[0]}")
        assert r.status_code == 200, r.text
        assert "http client not reading" in srv.log()
    finally:
        for s in socks:
            s.close()


def test_a_kept_alive_http_client_that_never_reads_its_answer_is_dropped(serve, tmp_path: Path) -> None:
    """One answer larger than the kernel's buffers (8 MB), never read: the request completes, but the
    keep-alive close that follows waited for the rest to be sent, for ever, megabytes held per connection."""
    make_model(tmp_path / "wide", "sliding", None, 2, (3,), (LayerConfig("linear", 8192),), seed=0)
    srv = serve(model_dir=tmp_path, dtype="float32", ws_send_timeout_s=1)
    sid = httpx.post(f"{srv.url}/v1/sessions", json={"model": "wide"}).json()["session_id"]
    sock = _never_reading_client(srv, [_steps_request(sid, 512)])  # 512 steps x 8192 spikes: 8.4 MB of JSON
    try:
        deadline = time.monotonic() + 30
        while not _reset(sock):
            assert time.monotonic() < deadline, "the server kept an HTTP client that does not read"
            time.sleep(0.1)
        assert httpx.get(f"{srv.url}/v1/sessions/{sid}").json()["steps_seen"] == 512
    finally:
        sock.close()


def test_a_client_that_never_reads_an_answer_computed_slowly_is_dropped_too(serve, tmp_path: Path) -> None:
    """The same, with the answer coming seconds after the request (the engine core held up): the watch on
    the connection, whose buffers are empty meanwhile, must not be forgotten while its request is in flight
    (it was, after a quarter of a second: seen once in a clean-clone run on a slow box)."""
    make_model(tmp_path / "wide", "sliding", None, 2, (3,), (LayerConfig("linear", 8192),), seed=0)
    srv = serve(model_dir=tmp_path, dtype="float32", ws_send_timeout_s=1)
    sid = httpx.post(f"{srv.url}/v1/sessions", json={"model": "wide"}).json()["session_id"]
    engine = httpx.get(f"{srv.url}/healthz").json()["engine_pid"]
    os.kill(engine, signal.SIGSTOP)
    try:
        sock = _never_reading_client(srv, [_steps_request(sid, 512)])
        time.sleep(1.5)  # several looks at an empty buffer
    finally:
        os.kill(engine, signal.SIGCONT)
    try:
        deadline = time.monotonic() + 30
        while not _reset(sock):
            assert time.monotonic() < deadline, "the server kept an HTTP client that does not read"
            time.sleep(0.1)
    finally:
        sock.close()


def test_a_slow_reader_is_not_taken_for_one_that_never_reads(serve, tmp_path: Path) -> None:
    """A client that reads a 4 MB answer at 400 kB/s gets all of it, although the bytes waiting in the
    front end's buffer stay put for longer than ``PSN_WS_SEND_TIMEOUT_S`` while the kernel's queue drains."""
    make_model(tmp_path / "wide", "sliding", None, 2, (3,), (LayerConfig("linear", 8192),), seed=0)
    srv = serve(model_dir=tmp_path, dtype="float32", ws_send_timeout_s=1)
    sid = httpx.post(f"{srv.url}/v1/sessions", json={"model": "wide"}).json()["session_id"]
    sock = _never_reading_client(srv, [_steps_request(sid, 256)])
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        head, body = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
        assert length > 4_000_000
        t0 = time.monotonic()
        while len(body) < length:  # at 400 kB/s (~10 s): unsent bytes sit for seconds; 1.5 MB/s would not show it
            time.sleep(max(0.0, len(body) / 400e3 - (time.monotonic() - t0)) + 0.001)
            chunk = sock.recv(65536)
            assert chunk, f"dropped after {len(body)} of {length} bytes"
            body += chunk
        assert json.loads(body)["steps_seen"] == 256
    finally:
        sock.close()


def test_slow_readers_watch_a_connection_while_its_request_runs_and_forget_it_after() -> None:
    """``SlowReaders`` keeps watching a connection whose request is still running although nothing is
    buffered yet, and forgets it once the request is done and its buffer empty (no watch left behind)."""
    class Transport:
        buffered = 0

        def get_write_buffer_size(self) -> int:
            return self.buffered

        def get_extra_info(self, name: str, default=None):
            return default

    class Cycle:
        def __init__(self) -> None:
            self.transport = Transport()

        async def send(self, message: dict) -> None:
            pass

    async def run() -> None:
        release = asyncio.Event()

        async def app(scope, receive, send) -> None:
            await release.wait()

        readers = SlowReaders(app, timeout_s=0.4)  # looks every 0.1 s
        cycle = Cycle()
        request = asyncio.create_task(readers({"type": "http"}, None, cycle.send))
        await asyncio.sleep(0.35)  # three looks at an empty buffer while the request runs
        assert cycle.transport in readers.watched
        release.set()
        await request
        await asyncio.sleep(0.25)
        assert readers.watched == {} and readers.task is not None and readers.task.done()

    asyncio.run(run())
