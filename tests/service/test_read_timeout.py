"""PSN_READ_TIMEOUT_S: a client must send each request whole (head and body) within the read timeout of its
first byte (its first request: of the connection's opening). Unit tests drive the front end's HTTP protocol
(service/frontend/protocols.py) with the protocol's timers on an injected clock; the end-to-end tests use a
real server and raw sockets, as a slow client would."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import uvicorn
import websockets.sync.client as ws_client
from uvicorn.server import ServerState
from websockets.exceptions import ConnectionClosedError

from service.frontend.protocols import http_protocol
from tests.service.conftest import Reference, Server, assert_outputs
from tests.service.test_gate import Transport as GateTransport

TIMEOUT = 10.0


class Transport(GateTransport):
    """test_gate's recording transport, which also knows its protocol (a WebSocket upgrade replaces it)."""

    protocol: Any = None

    def get_protocol(self) -> Any:
        return self.protocol

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol


class Timer:
    def __init__(self, when: float, callback: Callable[..., None], args: tuple) -> None:
        self.when, self.callback, self.args, self.cancelled = when, callback, args, False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """The protocol's event loop, with its timers on a clock the test moves (``advance``); tasks go to the
    running loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.now, self.timers = loop, 0.0, []

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> Timer:
        timer = Timer(self.now + delay, callback, args)
        self.timers.append(timer)
        return timer

    def pending(self) -> list[Timer]:
        return [t for t in self.timers if not t.cancelled]

    async def advance(self, dt: float) -> None:
        self.now += dt
        for t in sorted(self.pending(), key=lambda t: t.when):
            if t.when <= self.now and not t.cancelled:
                t.cancelled = True
                t.callback(*t.args)
        await settle()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


class App:
    """Reads each request's body, records what it received, answers 200 "ok" (after ``release`` is set)."""

    def __init__(self) -> None:
        self.received: list[list[dict]] = []
        self.answered: list[bytes] = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        got: list[dict] = []
        self.received.append(got)
        while True:
            msg = await receive()
            got.append(msg)
            if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
                break
        if got[-1]["type"] == "http.disconnect":
            return
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        self.answered.append(b"".join(m.get("body", b"") for m in got))


def connect(app: App, read_timeout_s: float | None = TIMEOUT) -> tuple[Any, Transport, Clock]:
    config = uvicorn.Config(app, log_level="warning")
    config.load()
    clock = Clock(asyncio.get_running_loop())
    protocol = http_protocol(1 << 15, None, read_timeout_s)(config=config, server_state=ServerState(),
                                                           app_state={}, _loop=clock)
    transport = Transport()
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    return protocol, transport, clock


def request(path: str = "/v1/sessions/s1/steps", body: bytes = b'{"steps": [[1.0]]}') -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)


def answer(transport: Transport) -> tuple[int, dict[str, str], bytes]:
    head, _, body = bytes(transport.out).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_a_connection_that_sends_nothing_is_closed_at_the_read_timeout() -> None:
    async def run() -> None:
        _, transport, clock = connect(App())
        await clock.advance(TIMEOUT - 0.1)
        assert not transport.closed
        await clock.advance(0.2)
        assert transport.closed and transport.out == b""  # nothing to answer: closed, as a keep-alive timeout does

    asyncio.run(run())


@pytest.mark.parametrize(("path", "cut"), [("/v1/sessions/s1/steps", 12), ("/v2/models/m/infer", 12),
                                           ("/v2/models/m/infer", 7)])  # 7: the url read as "/v", then "2/..."
def test_a_head_that_trickles_in_is_answered_408_in_the_apis_shape(path: str, cut: int) -> None:
    async def run() -> None:
        app = App()
        protocol, transport, clock = connect(app)
        whole = request(path)
        protocol.data_received(whole[:cut])
        await clock.advance(TIMEOUT / 2)
        protocol.data_received(whole[cut:30])  # bytes keep coming, but the request is not whole in time
        await clock.advance(TIMEOUT / 2 - 0.1)
        assert transport.out == b"" and not transport.closed
        await clock.advance(0.2)
        status, headers, body = answer(transport)
        assert status == 408 and transport.closed and headers["connection"] == "close"
        err = json.loads(body)["error"]
        if path.startswith("/v2"):  # the Open Inference Protocol's error shape
            assert "PSN_READ_TIMEOUT_S" in err
        else:
            assert err["code"] == "read_timeout" and err["field"] == "request"
            assert "PSN_READ_TIMEOUT_S" in err["message"]
        assert app.received == []  # the app never saw it

    asyncio.run(run())


def test_a_late_body_is_answered_408_and_the_app_gets_a_disconnect_not_half_a_body() -> None:
    async def run() -> None:
        app = App()
        protocol, transport, clock = connect(app)
        whole = request(body=b'{"steps": [[1.0], [2.0]]}')
        protocol.data_received(whole[:-10])  # the head and part of the body
        await settle()
        await clock.advance(TIMEOUT + 0.1)
        status, _, body = answer(transport)
        assert status == 408 and transport.closed and json.loads(body)["error"]["code"] == "read_timeout"
        assert app.received[0][-1] == {"type": "http.disconnect"} and app.answered == []

    asyncio.run(run())


def test_the_clock_starts_again_at_each_requests_first_byte() -> None:
    """A keep-alive connection's next request has the whole timeout from its own first byte, however long the
    connection has been open; a request that takes nearly the whole timeout is answered as usual."""

    async def run() -> None:
        app = App()
        protocol, transport, clock = connect(app)
        protocol.data_received(request(body=b'{"steps": [[1.0]]}'))
        await settle()
        assert app.answered == [b'{"steps": [[1.0]]}'] and not clock.pending()[:-1]  # only uvicorn's keep-alive
        await clock.advance(4.0)  # under uvicorn's 5 s keep-alive
        second = request(body=b'{"steps": [[2.0]]}')
        protocol.data_received(second[:20])
        await clock.advance(TIMEOUT - 0.1)  # 4 + 9.9 s after the connection opened
        protocol.data_received(second[20:])
        await settle()
        assert app.answered[-1] == b'{"steps": [[2.0]]}' and not transport.closed
        assert bytes(transport.out).count(b"HTTP/1.1 200") == 2

    asyncio.run(run())


def test_a_late_pipelined_head_lets_the_answer_before_it_go_out_first() -> None:
    async def run() -> None:
        app = App()
        app.release.clear()  # the first request's answer is still being made
        protocol, transport, clock = connect(app)
        protocol.data_received(request() + request()[:15])
        await settle()
        await clock.advance(TIMEOUT + 0.1)
        assert transport.out == b"" and not transport.closed  # no 408 in the middle of an answer
        app.release.set()
        await settle()
        status, headers, body = answer(transport)
        assert status == 200 and body == b"ok" and headers["connection"] == "close" and transport.closed

    asyncio.run(run())


def test_a_closed_connection_leaves_no_timer_behind() -> None:
    """A connection that goes away mid-request takes its read timer with it (a timer left armed would hold the
    closed connection's protocol and buffers for the rest of PSN_READ_TIMEOUT_S)."""
    async def run() -> None:
        protocol, _, clock = connect(App())
        protocol.data_received(request()[:20])
        assert clock.pending()
        protocol.connection_lost(None)
        assert clock.pending() == []

    asyncio.run(run())


def test_a_connection_already_closing_gets_no_408_after_its_answer() -> None:
    """A head refused 431 closes the connection, which stays open until its answer is flushed to a client that
    may not read it; the request's read timer firing meanwhile writes nothing behind that answer."""
    async def run() -> None:
        protocol, transport, clock = connect(App())
        protocol.data_received(b"GET /v1/models HTTP/1.1\r\nX-Pad: " + b"a" * (1 << 15))  # past the bound, no end
        assert transport.closed and bytes(transport.out).startswith(b"HTTP/1.1 431")
        answered = bytes(transport.out)
        await clock.advance(TIMEOUT + 0.1)
        assert bytes(transport.out) == answered

    asyncio.run(run())


def test_a_half_closed_connection_is_answered_then_closed() -> None:
    """A client that shuts down its sending side after its request gets the answer, marked and followed by the
    connection's close (uvicorn would keep it open for its keep-alive time, waiting for a request that cannot
    come)."""
    async def run() -> None:
        app = App()
        app.release.clear()
        protocol, transport, _ = connect(app)
        protocol.data_received(request())
        await settle()
        assert protocol.eof_received() is True  # keep the connection for the answer
        app.release.set()
        await settle()
        status, headers, body = answer(transport)
        assert status == 200 and body == b"ok" and headers["connection"] == "close" and transport.closed

    asyncio.run(run())


def test_no_read_timeout_no_timer() -> None:
    async def run() -> None:
        protocol, transport, clock = connect(App(), read_timeout_s=None)
        protocol.data_received(request()[:10])
        assert clock.pending() == []

    asyncio.run(run())


# ----- a real server, raw sockets ------------------------------------------------------------------
def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_clients_against_a_real_server(serve: Callable[..., Server], ref: Reference) -> None:
    srv = serve(read_timeout_s=1.0)
    with httpx.Client(base_url=srv.url, timeout=20) as client:
        sid = client.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        x = ref.sequence("sliding", 2, seed=31)
        body = json.dumps({"steps": x[:1].tolist()}).encode()
        head = (f"POST /v1/sessions/{sid}/steps HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode()
        # a head, then a body, that stop short: 408 read_timeout, nothing applied
        for partial in (head[:25], head + body[:5]):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                sock.sendall(partial)
                status, _, answer_body = read_all(sock).partition(b"\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 408"), status
            assert json.loads(answer_body)["error"]["code"] == "read_timeout"
        assert client.get(f"/v1/sessions/{sid}").json()["steps_seen"] == 0
        # connected, nothing sent: closed
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            t0 = time.monotonic()
            assert read_all(sock) == b""
            assert time.monotonic() - t0 < 8  # closed by the read timeout, not left open
        # a WebSocket is not a request being read: it stays open and usable past the read timeout
        with ws_client.connect(srv.ws_url) as ws:
            ws.send(json.dumps({"type": "attach", "session_id": sid}))
            assert json.loads(ws.recv())["type"] == "attached"
            time.sleep(1.5)
            ws.send(json.dumps({"type": "steps", "steps": x.tolist()}))
            assert_outputs(json.loads(ws.recv(timeout=10))["outputs"], ref.outputs("sliding", x))


def client_frame(payload: bytes, fin: bool = True, opcode: int = 1, announce: int | None = None) -> bytes:
    """A masked client frame of ``payload`` (under 126 bytes), its header announcing ``announce`` bytes if given."""
    mask = b"\x01\x02\x03\x04"
    n = len(payload) if announce is None else announce
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | n]) + mask + masked


@pytest.mark.parametrize("stall", ["a frame cut short", "a message of several frames cut short"])
def test_a_websocket_message_that_stops_short_is_closed_at_the_read_timeout(serve: Callable[..., Server],
                                                                            stall: str) -> None:
    """A client that sent the start of a WebSocket message and stalled held its connection, and whatever the
    front end had buffered of the message (up to the frame limit, 4 MB or more), for ever: each of up to
    PSN_MAX_CONNECTIONS connections could. A message must now come in whole within PSN_READ_TIMEOUT_S of its
    first byte, or the connection is closed 1008 naming the setting; whole messages between idle spells (and
    pings inside a message) are fine, as the end of the real-server test above shows."""
    srv = serve(read_timeout_s=1.0)
    with ws_client.connect(srv.ws_url) as ws:
        ws.send(json.dumps({"type": "open", "model": "sliding"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "opened"
        message = json.dumps({"type": "steps", "steps": [[0.5]]}).encode()
        if stall == "a frame cut short":
            ws.socket.sendall(client_frame(message[:10], announce=len(message)))
        else:
            ws.socket.sendall(client_frame(message[:10], fin=False) + client_frame(b"", opcode=9))  # then a ping
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosedError) as e:
            ws.recv(timeout=30)
        assert time.monotonic() - t0 < 25  # closed by the server, not by this client's own timeout
    assert e.value.rcvd is not None and e.value.rcvd.code == 1008, e.value
    assert "PSN_READ_TIMEOUT_S" in e.value.rcvd.reason
    assert 'psn_errors_total{code="read_timeout"}' in httpx.get(f"{srv.url}/metrics", timeout=10).text


class EchoApp:
    """Accepts a WebSocket and records the messages it receives."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while (msg := await receive())["type"] == "websocket.receive":
            self.messages.append(msg["text"])


async def ws_connected(app: Any) -> tuple[Any, Transport, Clock]:
    """The front end's WebSocket protocol (read timeout ``TIMEOUT``, timers on a ``Clock``) after a handshake
    that ``app`` accepts; no pings, which this client would leave unanswered."""
    from service.frontend.protocols import ws_protocol

    config = uvicorn.Config(app, log_level="warning", ws_ping_interval=None)
    config.load()
    clock = Clock(asyncio.get_running_loop())
    protocol = ws_protocol(None, TIMEOUT)(config=config, server_state=ServerState(), app_state={}, _loop=clock)
    transport = Transport()
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    protocol.data_received(b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                           b"Sec-WebSocket-Version: 13\r\n\r\n")
    await settle()
    return protocol, transport, clock


def test_a_steady_stream_of_whole_messages_is_never_timed_out() -> None:
    """Each message starts the clock again, even when no read ends on a message boundary (a client that
    streams long messages back to back): only one message taking the read timeout closes the connection."""
    asyncio.run(steady_stream())


async def steady_stream() -> None:

    app = EchoApp()
    protocol, transport, clock = await ws_connected(app)
    assert bytes(transport.out).startswith(b"HTTP/1.1 101")
    stream = b"".join(client_frame(b"message %d" % i) for i in range(8))
    cut = len(stream) // 8 + 3  # every read ends inside a frame
    for i in range(0, len(stream), cut):
        protocol.data_received(stream[i:i + cut])
        await clock.advance(0.6 * TIMEOUT)
        assert not transport.is_closing(), f"closed after {len(app.messages)} messages"
    assert app.messages == [f"message {i}" for i in range(8)]
    protocol.data_received(client_frame(b"cut", announce=10))
    await clock.advance(TIMEOUT)
    assert transport.is_closing()


def test_a_message_left_unread_while_the_app_is_busy_is_not_timed_out(serve: Callable[..., Server],
                                                                       ref: Reference) -> None:
    """uvicorn stops reading while a whole message waits for the app (busy with the one before), so the
    rest of a message begun in the same read may be sent and wait unread in the kernel: its clock ran on,
    and a client that pipelines its steps was closed 1008 read_timeout while the engine core was slow. The
    clock stops while reading is paused. (The engine core is stopped here for longer than the timeout.)"""
    import os
    import signal

    srv = serve(read_timeout_s=1.0)
    engine = httpx.get(f"{srv.url}/healthz", timeout=10).json()["engine_pid"]
    x = ref.sequence("sliding", 3, seed=5)
    with ws_client.connect(srv.ws_url) as ws:
        ws.send(json.dumps({"type": "open", "model": "sliding"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "opened"
        steps = [client_frame_long(json.dumps({"type": "steps", "steps": x[i:i + 1].tolist()}).encode())
                 for i in range(3)]
        os.kill(engine, signal.SIGSTOP)
        try:
            ws.socket.sendall(steps[0])  # the app takes it and waits on the stopped engine core
            time.sleep(0.3)
            ws.socket.sendall(steps[1] + steps[2][:-5])  # the second waits whole, reading pauses; the third begun
            time.sleep(0.3)
            ws.socket.sendall(steps[2][-5:])  # the third sent whole, left unread
            time.sleep(2.5)  # past the read timeout
        finally:
            os.kill(engine, signal.SIGCONT)
        for i in range(3):
            answer = json.loads(ws.recv(timeout=10))
            assert answer["type"] == "steps" and answer["start"] == i, answer
            assert_outputs(answer["outputs"], ref.outputs("sliding", x), start=i)


def client_frame_long(payload: bytes) -> bytes:
    """A masked final text frame of ``payload`` (any length under 64 KiB)."""
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class CloseAfterOneApp(EchoApp):
    """Accepts, reads one message, closes."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        self.messages.append((await receive())["text"])
        await send({"type": "websocket.close", "code": 1000})


def test_a_message_cut_short_after_the_app_closed_is_dropped_quietly() -> None:
    """The app closed the connection, and the client, instead of answering the close, stalls in the middle of
    its next message: at the read timeout the connection is dropped (a second close frame raised InvalidState
    in the timer's callback, logged as an error with its traceback)."""
    asyncio.run(closed_then_stalled())


async def closed_then_stalled() -> None:
    app = CloseAfterOneApp()
    protocol, transport, clock = await ws_connected(app)
    protocol.data_received(client_frame(b"one") + client_frame(b"cut", announce=10))
    await settle()
    assert app.messages == ["one"] and protocol.close_sent and not transport.is_closing()
    await clock.advance(TIMEOUT)  # raised InvalidState here
    assert transport.is_closing()
