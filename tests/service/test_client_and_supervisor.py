"""The front end's engine client (service/frontend/client.py) against a real asyncio Unix-socket server
written here that speaks service/ipc.py's frames (a stand-in engine core that answers ``hello`` and what
each test asks), the wire format itself, and the HTTP protocol's bound on a request's head
(service/frontend/protocols.py) driven directly. Timings are short; every await a broken client could
hang on is bounded."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from service.config import Settings
from service.errors import InvalidInput, QueueFull, RequestTimeout, ServiceError
from service.frontend.client import EngineClient, EngineUnavailable
from service.ipc import LENGTH, MAX_FRAME, error_answer, frame, listen, pack, parse_address, unpack
from service.supervisor import Supervisor, ctx

HELLO = {"models": [], "engine": {"pid": 4242}}


class FakeEngine:
    """A Unix-socket server speaking the engine core's frames: it answers ``hello``, records every request,
    and hands the others to ``on_request(request, writer)`` (which may answer, or not)."""

    def __init__(self, path: Path, on_request: Callable[[list, asyncio.StreamWriter], None] | None = None):
        self.path, self.on_request = str(path), on_request
        self.requests: list[list] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                (n,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
                for req in unpack(await reader.readexactly(n)):
                    self.requests.append(req)
                    if req[1] == "hello":
                        writer.write(frame([[req[0], 0, HELLO]]))
                    elif self.on_request is not None:
                        self.on_request(req, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def drop(self) -> None:
        """Close every connection (the engine core went away); the server keeps listening unless stopped."""
        for w in self.writers:
            w.close()
        self.writers.clear()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        self.drop()
        await self.server.wait_closed()
        Path(self.path).unlink(missing_ok=True)


async def connected(client: EngineClient, timeout: float = 2.0) -> float:
    """Wait until the client has said hello again; returns how long that took."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while not client.connected:
        assert time.monotonic() < deadline, "the client did not (re)connect in time"
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


async def disconnected(client: EngineClient, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while client.connected:
        assert time.monotonic() < deadline, "the client did not notice the engine core went away"
        await asyncio.sleep(0.005)


def run_with(tmp_path: Path, test: Callable[[FakeEngine, EngineClient], Any], *, timeout_s: float = 30.0,
             on_request: Callable[[list, asyncio.StreamWriter], None] | None = None, limit: float = 5.0) -> Any:
    async def main() -> Any:
        engine = FakeEngine(tmp_path / "engine.sock", on_request)
        await engine.start()
        client = EngineClient(f"unix:{engine.path}", timeout_s=timeout_s)
        await client.start()
        try:
            await connected(client)
            return await asyncio.wait_for(test(engine, client), limit)
        finally:
            await client.close()
            await engine.stop()

    return asyncio.run(main())


def answer_ok(req: list, writer: asyncio.StreamWriter) -> None:
    writer.write(frame([[req[0], 0, {"op": req[1], "args": req[2:]}]]))


# ----- answers, errors, events ------------------------------------------------------------------------
def test_answers_errors_and_events_reach_their_callers(tmp_path: Path) -> None:
    events: list[tuple[str, Any]] = []

    def on_request(req: list, writer: asyncio.StreamWriter) -> None:
        if req[1] == "close":
            err = QueueFull("queue: full", field="steps", retry_after=3)
            writer.write(frame([[0, "expired", "s9"], error_answer(req[0], err)]))
        elif req[1] == "ping":
            writer.write(frame([[req[0], 0, {"ready": False}]]))
        else:
            answer_ok(req, writer)

    async def test(engine: FakeEngine, client: EngineClient) -> None:
        client.on_event = lambda kind, body: events.append((kind, body))
        assert client.hello == HELLO and client.hello_seen.is_set()
        assert await client.call("get", "s1", False, "") == {"op": "get", "args": ["s1", False, ""]}
        with pytest.raises(ServiceError) as e:
            await client.call("close", "s1", "")
        assert (e.value.status, e.value.code, e.value.message, e.value.field, e.value.retry_after) == (
            503, "queue_full", "queue: full", "steps", 3)
        assert events == [("expired", "s9")]
        assert await client.ping(1.0) is False  # connected, but the engine core says it is not ready

    run_with(tmp_path, test, on_request=on_request)


def test_a_large_answer_is_read_whole(tmp_path: Path) -> None:
    """Answers of several MiB (a long classify, many steps) are one frame: the frame bound is far above them."""
    big = bytes(range(256)) * (8 << 12)  # 8 MiB

    def on_request(req: list, writer: asyncio.StreamWriter) -> None:
        writer.write(frame([[req[0], 0, big]]))

    async def test(engine: FakeEngine, client: EngineClient) -> None:
        assert await client.call("classify", "m", 1, b"") == big
        assert client.connected

    run_with(tmp_path, test, on_request=on_request)


def test_an_answer_for_a_request_its_caller_gave_up_on_is_dropped(tmp_path: Path) -> None:
    """A caller that went away cancels its future; the engine core's late answer must not break the
    connection for the requests behind it."""
    held: list[list] = []

    def on_request(req: list, writer: asyncio.StreamWriter) -> None:
        held.append(req)
        if req[2] != "gone":  # answer what is held, the abandoned one first
            for r in held:
                answer_ok(r, writer)
            held.clear()

    async def test(engine: FakeEngine, client: EngineClient) -> None:
        first = client.call("get", "gone")
        second = client.call("get", "here")
        await asyncio.sleep(0)
        first.cancel()
        assert (await second)["args"] == ["here"]
        assert client.connected and engine.connections == 1
        assert (await client.call("get", "after"))["args"] == ["after"]

    run_with(tmp_path, test, on_request=on_request)


# ----- timeouts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("timeout_s", "at_most"), [(0.1, 0.4), (0.3, 0.55)])  # a tick of 0.25 s: 0.5; 2x: 0.6
def test_an_unanswered_request_fails_504_after_the_timeout_and_not_before(tmp_path: Path, timeout_s: float,
                                                                        at_most: float) -> None:
    """The sweeper fails a request with 504 once it has waited ``timeout_s`` (to within its tick, a quarter
    of the timeout at most), never earlier, and leaves a younger request waiting."""

    async def test(engine: FakeEngine, client: EngineClient) -> None:
        t0 = time.monotonic()
        old = client.call("steps", "s1")
        await asyncio.sleep(timeout_s / 2)
        young = client.call("steps", "s2")
        with pytest.raises(RequestTimeout) as e:
            await old
        waited = time.monotonic() - t0
        assert e.value.status == 504 and e.value.code == "request_timeout"
        assert timeout_s <= waited < at_most, waited
        assert not young.done()  # issued half a timeout later: still waiting
        with pytest.raises(RequestTimeout):
            await young
        assert time.monotonic() - t0 >= 1.5 * timeout_s
        assert client.connected  # a timeout is not a lost connection

    run_with(tmp_path, test, timeout_s=timeout_s)


# ----- losing the engine core, reconnecting -----------------------------------------------------------------
def test_pending_requests_fail_503_at_once_when_the_engine_core_goes_away(tmp_path: Path) -> None:
    async def test(engine: FakeEngine, client: EngineClient) -> None:
        pending = [client.call("steps", "s1"), client.call("get", "s2")]
        while len(engine.requests) < 3:  # hello + both
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        engine.drop()
        for fut in pending:
            with pytest.raises(EngineUnavailable) as e:
                await asyncio.wait_for(fut, 2)
            assert e.value.status == 503 and e.value.code == "engine_unavailable"
        assert time.monotonic() - t0 < 1.0  # not the 30 s timeout
        await connected(client)  # the listener is still there: back at once, hello said again
        assert [r[1] for r in engine.requests].count("hello") == 2
        assert (await client.call("get", "s3"))["args"] == ["s3"]

    run_with(tmp_path, test, on_request=lambda req, w: answer_ok(req, w) if req[2] == "s3" else None)


def test_reconnect_attempts_back_off_to_at_most_half_a_second_and_start_over_after_a_connection(
        tmp_path: Path) -> None:
    async def test(engine: FakeEngine, client: EngineClient) -> None:
        await engine.stop()  # a restart of the engine core: nobody listens for a while
        await disconnected(client)
        with pytest.raises(EngineUnavailable):
            client.call("get", "s1")  # refused while disconnected
        await asyncio.sleep(1.6)  # attempts at about 0.05, 0.15, 0.35, 0.75, 1.25, 1.75 s
        await engine.start()
        assert await connected(client) < 1.0  # the next attempt is at most 0.5 s away (a 5 s cap: 1.55 s)
        # a second, short outage: the backoff started over with the connection (0.05, 0.1, ...)
        await engine.stop()
        await disconnected(client)
        t0 = time.monotonic()
        await asyncio.sleep(0.06)
        await engine.start()
        await connected(client)
        assert time.monotonic() - t0 < 0.4

    run_with(tmp_path, test)


def test_an_oversized_frame_from_the_engine_core_drops_the_connection(tmp_path: Path) -> None:
    """A length prefix over MAX_FRAME means a broken peer: the client does not wait for a GiB, it fails the
    request at once and reconnects."""

    def on_request(req: list, writer: asyncio.StreamWriter) -> None:
        writer.write(LENGTH.pack(MAX_FRAME + 1) + b"\0" * 64)  # and the connection stays open

    async def test(engine: FakeEngine, client: EngineClient) -> None:
        with pytest.raises(EngineUnavailable):
            await asyncio.wait_for(client.call("steps", "s1"), 2)
        await connected(client)
        assert engine.connections == 2

    run_with(tmp_path, test, on_request=on_request)


def test_a_failing_hello_handler_still_leaves_the_client_connected(tmp_path: Path) -> None:
    async def main() -> None:
        engine = FakeEngine(tmp_path / "engine.sock", answer_ok)
        await engine.start()
        client = EngineClient(f"unix:{engine.path}")

        def on_hello(hello: dict) -> None:
            raise RuntimeError("a bug in the hello handler")

        client.on_hello = on_hello
        await client.start()
        try:
            await asyncio.wait_for(client.hello_seen.wait(), 2)  # the app's startup waits on this
            assert client.connected
            assert (await asyncio.wait_for(client.call("get", "s1"), 2))["args"] == ["s1"]
        finally:
            await client.close()
            await engine.stop()

    asyncio.run(main())


def test_a_request_on_a_closing_connection_fails_503_at_once() -> None:
    async def run() -> None:
        ours, theirs = socket.socketpair()
        _, writer = await asyncio.open_connection(sock=ours)
        client = EngineClient("unix:/nowhere")
        client._writer = writer
        writer.close()  # the engine core's connection is being closed; the reader has not noticed yet
        with pytest.raises(EngineUnavailable):
            await asyncio.wait_for(client._call("get", "s1"), 1)
        theirs.close()

    asyncio.run(run())


def test_a_string_msgpack_cannot_encode_fails_alone() -> None:
    """msgpack refuses a string with a lone surrogate (JSON can carry one: "\\ud800") with a ValueError
    (UnicodeEncodeError), as it refuses too big integers with OverflowError: either is a 422 for that request
    alone, never a lost turn."""

    async def run() -> None:
        ours, theirs = socket.socketpair()
        _, writer = await asyncio.open_connection(sock=ours)
        client = EngineClient("unix:/nowhere")
        client._writer = writer
        good = client._call("get", "s1")
        bad = client._call("get", "s2\ud800")
        with pytest.raises(InvalidInput):
            await asyncio.wait_for(bad, 1)
        theirs.setblocking(False)
        await asyncio.sleep(0.02)
        data = theirs.recv(1 << 16)
        (n,) = LENGTH.unpack_from(data)
        assert [item[1:] for item in unpack(data[LENGTH.size:LENGTH.size + n])] == [["get", "s1"]]
        assert not good.done()
        good.cancel()
        writer.close()
        theirs.close()

    asyncio.run(run())


# ----- the wire format and addresses -------------------------------------------------------------------------
def test_a_frame_is_a_little_endian_u32_length_and_one_msgpack_document() -> None:
    items = [[1, "steps", "s1", -1, 1, b"\x00\x00\x80\x3f"]]
    data = frame(items)
    body = msgpack.packb(items, use_bin_type=True)
    assert data == len(body).to_bytes(4, "little") + body  # the documented wire: other hosts read it (tcp:)
    assert pack(items) == body and unpack(body) == items


def test_error_answers_carry_every_field() -> None:
    err = ServiceError("x: bad", field="x", retry_after=7, status=409, code="conflict")
    rid, status, body = unpack(pack([error_answer(5, err)]))[0]
    assert (rid, status, body) == (5, 409, ["conflict", "x: bad", "x", 7])


@pytest.mark.parametrize(("address", "parsed"), [
    ("unix:/tmp/e.sock", ("unix", "/tmp/e.sock", 0)),
    ("tcp:10.0.0.2:7000", ("tcp", "10.0.0.2", 7000)),
    ("tcp:[::1]:7000", ("tcp", "::1", 7000)),
])
def test_engine_addresses(address: str, parsed: tuple[str, str, int]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", ["unix:", "tcp::7000", "tcp:host:", "tcp:host:x", "udp:h:1", "/tmp/e.sock"])
def test_bad_engine_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="PSN_ENGINE_ADDRESS"):
        parse_address(address)


def test_listening_again_on_a_stale_unix_socket_replaces_it(tmp_path: Path) -> None:
    """An engine core that crashed leaves its socket file; the restarted one must listen on it again."""
    address = f"unix:{tmp_path / 'e.sock'}"
    first = listen(address, 4)
    first.close()  # the file stays, as after a crash
    assert (tmp_path / "e.sock").exists()
    second = listen(address, 4)
    try:
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(tmp_path / "e.sock"))
    finally:
        second.close()



@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_an_engine_core_restarted_on_its_tcp_port_listens_again_at_once(host: str) -> None:
    """The old engine core closed a connection first, so its port holds one in TIME_WAIT: the restarted one
    must still listen there (not fail with 'address in use' for a minute), over IPv4 and IPv6."""
    first = listen(f"tcp:{host}:0", 4)
    port = first.getsockname()[1]
    with socket.create_connection((host.strip("[]"), port)) as c:
        conn, _ = first.accept()
        conn.close()  # the engine side closes first: its end of the connection waits in TIME_WAIT
        c.recv(1)
    first.close()
    second = listen(f"tcp:{host}:{port}", 4)
    try:
        with socket.create_connection((host.strip("[]"), port)):
            pass
    finally:
        second.close()

# ----- the HTTP protocol's bound on a request's head ------------------------------------------------------------
def serve_bytes(max_bytes: int, pieces: list[bytes]) -> tuple[bytes, bool, list[str]]:
    """Feed ``pieces`` (one read each) to the front end's HTTP protocol bounded at ``max_bytes``; what it
    wrote, whether it closed the connection, and the paths the app was asked for."""
    import uvicorn
    from uvicorn.server import ServerState

    from service.frontend.protocols import http_protocol
    from tests.service.test_gate import Transport

    seen: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run() -> tuple[bytes, bool]:
        config = uvicorn.Config(app, log_level="critical")
        config.load()
        protocol = http_protocol(max_bytes)(config=config, server_state=ServerState(), app_state={})
        transport = Transport()
        protocol.connection_made(transport)
        for piece in pieces:
            protocol.data_received(piece)
        for _ in range(20):
            await asyncio.sleep(0)
        out = bytes(transport.out), transport.closed
        protocol.connection_lost(None)
        return out

    out, closed = asyncio.run(run())
    return out, closed, seen


def head_of(path: bytes, size: int) -> bytes:
    """A GET whose url and header lines (``Name: value\\r\\n``) come to ``size`` bytes."""
    fixed = len(path) + len(b"Host: localhost\r\n") + len(b"X-Pad: \r\n")
    return b"GET %s HTTP/1.1\r\nHost: localhost\r\nX-Pad: %s\r\n\r\n" % (path, b"a" * (size - fixed))


@pytest.mark.parametrize(("path", "oip"), [(b"/v1/sessions", False), (b"/v2/models", True)])
def test_a_head_of_exactly_the_bound_is_served_and_one_byte_more_is_431(path: bytes, oip: bool) -> None:
    out, closed, seen = serve_bytes(200, [head_of(path, 200)])
    assert out.startswith(b"HTTP/1.1 200") and seen == [path.decode()] and not closed
    out, closed, seen = serve_bytes(200, [head_of(path, 201)])
    assert out.startswith(b"HTTP/1.1 431") and seen == [] and closed
    error = json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]
    if oip:  # the Open Inference Protocol's shape under /v2
        assert isinstance(error, str) and "200 bytes" in error
    else:
        assert error["code"] == "headers_too_large" and error["field"] == "headers"


def test_a_head_that_does_not_end_is_stopped_past_the_bound() -> None:
    """Read in pieces, a head still incomplete is refused once the bytes read for it pass the bound, not at it."""
    start = b"GET /v1/sessions HTTP/1.1\r\nX-Pad: "
    pieces = [start, b"a" * (150 - len(start)), b"a" * 50]  # 200 bytes, no end yet
    out, closed, seen = serve_bytes(200, pieces)
    assert out == b"" and not closed and seen == []
    out, closed, seen = serve_bytes(200, [*pieces, b"a"])
    assert out.startswith(b"HTTP/1.1 431") and closed and seen == []


def test_a_head_that_does_not_end_is_stopped_on_a_kept_alive_connection_too() -> None:
    """The bound on bytes read for an incomplete head holds for each request of a connection, not only its first
    (a request ending in one read must not leave the next one's head uncounted)."""
    start = b"GET /v1/sessions HTTP/1.1\r\nX-Pad: "
    out, closed, seen = serve_bytes(200, [head_of(b"/v1/models", 100), start, b"a" * (201 - len(start))])
    assert b"HTTP/1.1 431" in out and closed and seen == ["/v1/models"]


def test_a_request_refused_400_in_a_read_past_the_bound_gets_that_one_answer() -> None:
    """A head httptools cannot parse is answered 400 and the connection closed; that the read it came in was over
    the bound adds no 431 behind the 400."""
    out, closed, seen = serve_bytes(200, [b"GET /v1/models HTTP/1.1\r\nX-Bad\x01: 1\r\nX-Pad: " + b"a" * 300])
    assert out.startswith(b"HTTP/1.1 400") and out.count(b"HTTP/1.1 4") == 1 and closed and seen == []


# ----- the supervisor's restarts, with stand-in processes --------------------------------------------------------
def _exit_3_if_multiproc_dir() -> None:
    import os
    import sys

    sys.exit(3 if "PROMETHEUS_MULTIPROC_DIR" in os.environ else 0)


class StandInSupervisor(Supervisor):
    """The real supervisor, whose front ends are stand-in processes (``target``) instead of uvicorn servers."""

    def __init__(self, target: Callable[..., None], args: tuple = ()):
        super().__init__(Settings(host="127.0.0.1", port=0, workers=2))
        self.target, self.args = target, args
        self.started: list[int] = []

    def start_frontend(self, i: int) -> None:
        p = ctx.Process(target=self.target, args=self.args, daemon=True)
        self.spawn(p, frontend=True)
        self.frontends[i] = p
        self.started.append(i)

    def close(self) -> None:
        for p in self.frontends:
            if p is not None and p.is_alive():
                p.kill()
                p.join(5)
        self.sock.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


def joined(p: Any, timeout: float = 10.0) -> Any:
    p.join(timeout)
    assert not p.is_alive()
    return p


def test_a_dead_front_end_is_restarted_and_its_live_gauges_dropped_unless_stopping() -> None:
    sup = StandInSupervisor(time.sleep, (30,))
    try:
        sup.start_frontend(0)
        sup.start_frontend(1)
        dead = sup.frontends[0]
        dead.kill()
        joined(dead)
        gauge = Path(sup.metrics_dir) / f"gauge_livesum_{dead.pid}.db"  # a dead process's live gauge file
        gauge.write_bytes(b"")
        sup.restart_frontends()
        assert sup.started == [0, 1, 0] and sup.frontends[0] is not dead and sup.frontends[0].is_alive()
        assert not gauge.exists()  # its values no longer count in /metrics
        sup.restart_frontends()  # nothing else died
        assert sup.started == [0, 1, 0]
        sup.request_stop()  # stopping: front ends that exit are not started again
        for p in sup.frontends:
            p.kill()
            joined(p)
        sup.restart_frontends()
        assert sup.started == [0, 1, 0]
    finally:
        sup.close()


def _front_end_with_metrics(connections: int) -> None:
    from service.metrics import FrontendMetrics  # imported here: PROMETHEUS_MULTIPROC_DIR is set by now

    metrics = FrontendMetrics()
    metrics.connections.set(connections)
    metrics.error("not_found")
    time.sleep(30)


def test_every_front_end_reports_the_sum_over_the_live_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """What any front end's /metrics says (``FrontendMetrics.text`` in the shared folder): counters summed over
    every front end that ran, the WebSocket connections gauge over the live ones only."""
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import FrontendMetrics

    def values() -> tuple[float, float]:
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", sup.metrics_dir)  # as in a front end (spawn() unsets it)
        samples = {s.name: s.value for f in text_string_to_metric_families(FrontendMetrics().text()) for s in f.samples
                   if s.name in ("psn_ws_connections", "psn_errors_total")}
        return samples.get("psn_ws_connections", 0.0), samples.get("psn_errors_total", 0.0)

    sup = StandInSupervisor(_front_end_with_metrics, (3,))
    try:
        sup.start_frontend(0)
        sup.start_frontend(1)
        deadline = time.monotonic() + 60  # spawned processes import the test module: seconds on a busy box
        while values() != (6, 2):
            assert time.monotonic() < deadline, values()
            time.sleep(0.05)
        # a front end starting this very moment: its file made, not yet sized (a scrape then answered 500)
        (Path(sup.metrics_dir) / "counter_4242424.db").touch()
        assert values() == (6, 2)
        dead = sup.frontends[0]
        dead.kill()
        joined(dead)
        sup.restart_frontends()
        while values() != (6, 3):  # the new one's 3 connections, not the dead one's; every error counted
            assert time.monotonic() < deadline, values()
            time.sleep(0.05)
    finally:
        sup.close()


def _child_that_dies_with_its_parent() -> None:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time\nfrom service.lifetime import die_with_parent\n"
                              "die_with_parent()\nprint('ready', flush=True)\ntime.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    print(child.pid, flush=True)
    time.sleep(60)


def _kill_the_parent_and_wait_for_its_child(entry: str, timeout: float) -> None:
    """Run ``entry`` (a function of this module that starts a child and prints its pid) in a parent process,
    kill the parent with SIGKILL, and fail unless the child has ended within ``timeout`` seconds."""
    import os
    import signal
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", f"from tests.service.test_client_and_supervisor import "
                               f"{entry} as f; f()"], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() and "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text():
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError("the child outlived its parent")
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()


def test_a_process_that_calls_die_with_parent_ends_when_its_parent_is_killed() -> None:
    """What keeps an engine core or a front end from outliving a supervisor killed with SIGKILL."""
    _kill_the_parent_and_wait_for_its_child("_child_that_dies_with_its_parent", 20)


def _late_child(parent: int) -> None:
    """A multiprocessing child that calls die_with_parent only after its parent has been killed."""
    import os

    from service.lifetime import die_with_parent, spawned_by

    assert spawned_by() == parent
    deadline = time.monotonic() + 20
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.01)
    die_with_parent(parent=spawned_by())
    time.sleep(60)


def _parent_of_a_late_child() -> None:
    import multiprocessing as mp
    import os

    p = mp.get_context("spawn").Process(target=_late_child, args=(os.getpid(),))
    p.start()
    print(p.pid, flush=True)
    time.sleep(60)


def test_a_child_whose_parent_died_before_it_called_die_with_parent_ends_too() -> None:
    """The kernel sends nothing for a parent death before prctl: an engine core still importing torch when
    its supervisor is killed must end as soon as it gets to the call, not serve on as an orphan."""
    _kill_the_parent_and_wait_for_its_child("_parent_of_a_late_child", 30)



def _child_that_hears_of_its_parents_death() -> None:
    """As _child_that_dies_with_its_parent, asking for SIGUSR2 and noting it in $PSN_TEST_HEARD when it comes."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import os, signal, time\n"
                              "from service.lifetime import die_with_parent\n"
                              "def heard(sig, _):\n    open(os.environ['PSN_TEST_HEARD'], 'w').write(str(sig))\n"
                              "    os._exit(0)\n"
                              "signal.signal(signal.SIGUSR2, heard)\ndie_with_parent(signal.SIGUSR2)\n"
                              "print('ready', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    print(child.pid, flush=True)
    time.sleep(60)


def test_die_with_parent_sends_the_signal_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's signal at the parent's death, and the one sent at once for a parent already gone, are
    ``sig`` (the engine core asks for SIGTERM to drain; another signal would skip that), and a process
    whose parent is the one given goes on; a process multiprocessing did not start has no spawner."""
    import os
    import signal
    import subprocess
    import sys

    monkeypatch.setenv("PSN_TEST_HEARD", str(tmp_path / "heard"))
    _kill_the_parent_and_wait_for_its_child("_child_that_hears_of_its_parents_death", 20)
    assert (tmp_path / "heard").read_text() == str(int(signal.SIGUSR2))
    code = ("import os, signal, sys\nfrom service.lifetime import die_with_parent, spawned_by\n"
            "assert spawned_by() is None\ndie_with_parent(signal.SIGUSR2, parent=int(sys.argv[1]))")
    root = Path(__file__).resolve().parents[2]
    gone = subprocess.run([sys.executable, "-c", code, "1"], cwd=root)  # pid 1 never started it
    assert gone.returncode == -signal.SIGUSR2
    here = subprocess.run([sys.executable, "-c", code, str(os.getpid())], cwd=root)
    assert here.returncode == 0

def test_only_front_ends_get_the_shared_metrics_folder() -> None:
    """prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is imported: the engine core must not get it
    (its metrics travel over the IPC), nor keep it in the supervisor's own environment."""
    import os

    sup = StandInSupervisor(_exit_3_if_multiproc_dir)
    try:
        front = ctx.Process(target=_exit_3_if_multiproc_dir, daemon=True)
        engine = ctx.Process(target=_exit_3_if_multiproc_dir, daemon=True)
        sup.spawn(front, frontend=True)
        assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # set for the front end's start only
        sup.spawn(engine, frontend=False)
        assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
        assert (joined(front).exitcode, joined(engine).exitcode) == (3, 0)
    finally:
        sup.close()


@pytest.mark.parametrize("bad", [LENGTH.pack(1) + b"\xc1",  # a byte msgpack never uses
                                 frame([[1, 2]]),  # an answer without its body
                                 frame([[0, "expired", "s1"]])])  # an event whose listener fails
def test_a_frame_the_client_cannot_take_drops_the_connection_and_it_reconnects(tmp_path: Path, bad: bytes) -> None:
    """Like an oversized frame, an answer the client cannot decode or hand on means a broken peer (or a bug in
    an event listener): the connection is dropped and made again, never left down for good."""
    sent: list[bytes] = []

    def on_request(req: list, writer: asyncio.StreamWriter) -> None:
        if not sent:
            sent.append(bad)
            writer.write(bad)
        else:
            answer_ok(req, writer)

    def on_event(kind: str, body: Any) -> None:
        raise RuntimeError("a bug in the event listener")

    async def test(engine: FakeEngine, client: EngineClient) -> None:
        client.on_event = on_event
        with pytest.raises(EngineUnavailable):
            await asyncio.wait_for(client.call("get", "s1"), 2)
        await connected(client)
        assert (await client.call("get", "s2"))["args"] == ["s2"]
        assert engine.connections == 2

    run_with(tmp_path, test, on_request=on_request)
