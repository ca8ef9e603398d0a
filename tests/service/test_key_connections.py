"""PSN_KEY_MAX_CONNECTIONS: the WebSockets one API key may hold open at once on a front-end process. Without
it one key could hold every PSN_MAX_CONNECTIONS place and lock every other key out of /v1/stream. A handshake
past the cap is refused 429 before it is accepted; the key's place comes back exactly once however its
connection ends. Real server (one front end: the counts are per process) and real clients; the unit tests
drive the middleware with small ASGI apps."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed, InvalidStatus

from service.config import Settings
from service.frontend.app import create_app
from service.frontend.auth import KeyConnectionLimit
from service.frontend.limits import OWNER
from tests.service.conftest import Server
from tests.service.test_admission import send_until_dropped
from tests.service.test_read_timeout import client_frame

KEY_A, KEY_B, KEY_C = "conn-key-a-0123456789abcdef", "conn-key-b-0123456789abcdef", "conn-key-c-0123456789abcdef"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def connect(srv: Server, key: str) -> ws_client.ClientConnection:
    return ws_client.connect(srv.ws_url, additional_headers=auth(key), open_timeout=10)


def opened(ws: ws_client.ClientConnection) -> bool:
    ws.send(json.dumps({"type": "open", "model": "sliding"}))
    return json.loads(ws.recv(timeout=10))["type"] == "opened"


def refusal(srv: Server, key: str) -> tuple[int, dict[str, str], dict] | None:
    """Status, headers (lower-case names) and body of the HTTP answer refusing a handshake of ``key`` (None:
    it was accepted, and is closed again)."""
    try:
        with connect(srv, key):
            return None
    except InvalidStatus as e:
        r = e.response
        return r.status_code, {k.lower(): v for k, v in r.headers.raw_items()}, json.loads(r.body or b"null")


def assert_cap_refusal(r: tuple[int, dict[str, str], dict] | None, cap: int) -> None:
    assert r is not None, "accepted past the key's cap"
    status, headers, body = r
    assert status == 429 and headers["retry-after"] == "1", r
    err = body["error"]
    assert err["code"] == "too_many_key_connections" and f"PSN_KEY_MAX_CONNECTIONS={cap}" in err["message"], err
    assert "per process" in err["message"]


def connect_when_free(srv: Server, key: str, refused: list[int] | None = None) -> ws_client.ClientConnection:
    """A connection of ``key`` with a session open on it, once the key's place (and a PSN_MAX_CONNECTIONS
    place) has come back: the server sees a connection end on its own time. ``refused`` counts the
    handshakes refused on the way."""
    deadline = time.monotonic() + 20
    while True:
        try:
            ws = connect(srv, key).__enter__()  # closed by the caller's with, or below
        except InvalidStatus as e:
            assert e.response.status_code == 429, e.response.body
            if refused is not None:
                refused[0] += 1
        else:
            ws.send(json.dumps({"type": "open", "model": "sliding"}))
            answer = json.loads(ws.recv(timeout=10))
            if answer["type"] == "opened":
                return ws
            assert answer["error"]["code"] == "too_many_connections", answer  # accepted, then told it is full
            ws.close()
        assert time.monotonic() < deadline, "the key's place never came back"
        time.sleep(0.05)


def errors_counted(srv: Server, code: str) -> float:
    text = httpx.get(f"{srv.url}/metrics", headers=auth(KEY_B), timeout=10).text
    m = re.search(rf'^psn_errors_total\{{code="{code}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_key_past_its_cap_is_refused_before_accept_while_other_keys_connect(serve) -> None:
    srv = serve(workers=1, api_keys=f"{KEY_A},{KEY_B}", key_max_connections=2)
    refused = [0]
    with ExitStack() as stack:
        a1, a2 = (stack.enter_context(connect(srv, KEY_A)) for _ in range(2))
        assert opened(a1) and opened(a2)
        assert_cap_refusal(refusal(srv, KEY_A), 2)  # the third: the HTTP answer to its handshake, never a 101
        refused[0] += 1
        b1, b2 = (stack.enter_context(connect(srv, KEY_B)) for _ in range(2))  # another key is not locked out
        assert opened(b1) and opened(b2)
        with httpx.Client(base_url=srv.url, headers=auth(KEY_A), timeout=10) as c:  # nor is A's HTTP
            assert c.post("/v1/sessions", json={"model": "sliding"}).status_code == 201
            assert c.get("/v1/models").status_code == 200
        assert opened(a1)  # A's two connections work on
        a1.close()  # a clean close gives its place back
        stack.enter_context(connect_when_free(srv, KEY_A, refused))
        assert_cap_refusal(refusal(srv, KEY_A), 2)  # and A is at its cap again: the close counted once
        refused[0] += 1
        assert errors_counted(srv, "too_many_key_connections") == refused[0]


def raw_handshake(srv: Server, key: str, rcvbuf: int = 0) -> socket.socket:
    """A WebSocket of ``key`` on a plain socket, past its 101 (``rcvbuf``: a small receive buffer); refused
    429 (the key's place not back yet), it tries again."""
    deadline = time.monotonic() + 20
    while True:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", srv.port))
        sock.settimeout(10)
        nonce = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(f"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n"
                     "\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        if head.startswith(b"HTTP/1.1 101"):
            return sock
        sock.close()
        assert head.startswith(b"HTTP/1.1 429") and time.monotonic() < deadline, head
        time.sleep(0.05)


def drop_abruptly(srv: Server) -> None:
    sock = raw_handshake(srv, KEY_A)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a TCP reset, no close frame


def kill_the_client(srv: Server) -> None:
    code = ("import time\nfrom websockets.exceptions import InvalidStatus\nfrom websockets.sync.client import connect\n"
            "while True:\n    try:\n"
            f"        ws = connect({srv.ws_url!r}, additional_headers={auth(KEY_A)!r}).__enter__()\n        break\n"
            "    except InvalidStatus:\n        time.sleep(0.05)\n"
            "print('open', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "open\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def stall_mid_message(srv: Server) -> None:
    """The server closes it (1008) at PSN_READ_TIMEOUT_S."""
    with connect_when_free(srv, KEY_A) as ws:
        ws.socket.sendall(client_frame(b'{"type": "st', announce=40))
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=30)
    assert e.value.rcvd is not None and e.value.rcvd.code == 1008, e.value


def stop_reading(srv: Server) -> None:
    """The server drops it at PSN_WS_SEND_TIMEOUT_S: its answers found no room."""
    send_until_dropped(raw_handshake(srv, KEY_A, rcvbuf=4096))


def refuse_after_accept(srv: Server) -> None:
    """B and C hold both PSN_MAX_CONNECTIONS places: A, under its cap, is accepted, then told the front end
    is full (1013)."""
    with connect(srv, KEY_B), connect(srv, KEY_C):
        deadline = time.monotonic() + 20
        while (r := refusal(srv, KEY_A)) is not None:  # A's place from before not back yet
            assert r[0] == 429 and time.monotonic() < deadline, r
            time.sleep(0.05)
        with connect(srv, KEY_A) as a:
            assert json.loads(a.recv(timeout=10))["error"]["code"] == "too_many_connections"
            with pytest.raises(ConnectionClosed) as e:
                a.recv(timeout=10)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1013


@pytest.mark.parametrize("end", [drop_abruptly, kill_the_client, stall_mid_message, stop_reading, refuse_after_accept],
                         ids=lambda f: f.__name__)
def test_a_keys_place_comes_back_once_however_its_connection_ends(serve, end: Callable[[Server], None]) -> None:
    srv = serve(workers=1, api_keys=f"{KEY_A},{KEY_B},{KEY_C}", key_max_connections=1, max_connections=2,
                read_timeout_s=1, ws_send_timeout_s=1)
    with connect_when_free(srv, KEY_A):  # a clean close gives the place back ...
        pass
    end(srv)  # ... and so does this end: A can connect again
    with connect_when_free(srv, KEY_A), connect_when_free(srv, KEY_B):  # both PSN_MAX_CONNECTIONS places held
        # given back once: A holds its one place again; refused for it before accept, though the front end is full
        assert_cap_refusal(refusal(srv, KEY_A), 1)


# ----- the middleware alone ---------------------------------------------------------------------------
def ws_scope(owner: str) -> dict[str, Any]:
    return {"type": "websocket", "path": "/v1/stream", "headers": [], OWNER: owner,
            "extensions": {"websocket.http.response": {}}}


async def call(mw: KeyConnectionLimit, scope: dict[str, Any]) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    async def send(msg: dict) -> None:
        sent.append(msg)

    await mw(scope, receive, send)
    return sent


def test_the_middleware_counts_each_connection_once_however_the_app_ends() -> None:
    async def run() -> None:
        release = asyncio.Event()

        async def held(scope: Any, receive: Any, send: Any) -> None:
            await release.wait()

        mw = KeyConnectionLimit(held, cap=2)
        first = [asyncio.create_task(call(mw, ws_scope("a"))) for _ in range(2)]
        await asyncio.sleep(0)
        assert mw.held == {"a": 2}
        refused = await call(mw, ws_scope("a"))
        assert refused[0]["type"] == "websocket.http.response.start" and refused[0]["status"] == 429
        assert json.loads(refused[1]["body"])["error"]["code"] == "too_many_key_connections"
        other = asyncio.create_task(call(mw, ws_scope("b")))  # another key is counted apart
        await asyncio.sleep(0)
        assert mw.held == {"a": 2, "b": 1}
        first[0].cancel()  # the connection's task cancelled
        await asyncio.sleep(0)
        assert mw.held == {"a": 1, "b": 1}
        release.set()
        await asyncio.gather(first[1], other)
        assert mw.held == {}

        async def fails(scope: Any, receive: Any, send: Any) -> None:
            raise RuntimeError("the app failed")

        mw = KeyConnectionLimit(fails, cap=1)
        for _ in range(2):
            with pytest.raises(RuntimeError):
                await call(mw, ws_scope("a"))
            assert mw.held == {}
        for scope in ({**ws_scope(""), OWNER: ""}, {"type": "http", "path": "/v1/models", "headers": [], OWNER: "a"}):
            with pytest.raises(RuntimeError):  # let through uncounted: a public path, or HTTP
                await call(mw, scope)
            assert mw.held == {}

    asyncio.run(run())


def test_without_keys_the_setting_adds_nothing() -> None:
    def layers(**kw: Any) -> list[type]:
        return [m.cls for m in create_app(Settings(**kw), "unix:/nonexistent").user_middleware]

    assert KeyConnectionLimit not in layers(key_max_connections=2)
    assert KeyConnectionLimit not in layers(api_keys=KEY_A)
    assert KeyConnectionLimit in layers(api_keys=KEY_A, key_max_connections=2)
