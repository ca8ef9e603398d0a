"""Bounded admission through the real server: one session's queue, request deadlines, the connection
limit, and clients that stop reading (oversized WebSocket messages: test_errors.py). Each refusal is a clear error (with
Retry-After / ``retry_after`` where waiting helps), never a hang.

The engine core is paused with SIGSTOP where a test needs requests to pile up in a known order (they
wait in its socket, and it reads them all in one turn when SIGCONT wakes it)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import websockets
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed

from tests.service.conftest import Server


def engine_pid(srv: Server) -> int:
    return httpx.get(f"{srv.url}/healthz").json()["engine_pid"]


@contextmanager
def engine_paused(srv: Server) -> Iterator[None]:
    pid = engine_pid(srv)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def open_session(srv: Server) -> str:
    return httpx.post(f"{srv.url}/v1/sessions", json={"model": "sliding"}).json()["session_id"]


def test_one_sessions_queue_is_bounded_and_a_stuck_engine_times_out(serve) -> None:
    srv = serve(session_queue=2, request_timeout_s=2)
    sid = open_session(srv)
    url, step = f"/v1/sessions/{sid}/steps", {"steps": [[0.5, 0.5, 0.5]]}

    pid = engine_pid(srv)

    async def flood(ws) -> tuple[list[httpx.Response], dict]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
            first = [asyncio.create_task(c.post(url, json=step)) for _ in range(2)]
            await asyncio.sleep(0.5)  # those two reach the (paused) engine core's socket first
            ws.send(json.dumps({"type": "steps", **step, "id": 1}))
            await asyncio.sleep(0.1)
            later = [asyncio.create_task(c.post(url, json=step)) for _ in range(2)]
            await asyncio.sleep(0.3)
            os.kill(pid, signal.SIGCONT)
            return await asyncio.gather(*first, *later), json.loads(ws.recv(timeout=10))

    with ws_client.connect(srv.ws_url) as ws:
        ws.send(json.dumps({"type": "attach", "session_id": sid}))
        json.loads(ws.recv(timeout=5))
        os.kill(pid, signal.SIGSTOP)
        rs, ws_answer = asyncio.run(flood(ws))
        assert [r.status_code for r in rs] == [200, 200, 429, 429], [r.text for r in rs]
        assert sorted(r.json()["start"] for r in rs[:2]) == [0, 1]
        for r in rs[2:]:
            assert r.json()["error"]["code"] == "session_queue_full" and r.headers["Retry-After"] == "1"
        assert ws_answer["type"] == "error" and ws_answer["id"] == 1
        assert ws_answer["error"]["code"] == "session_queue_full" and ws_answer["error"]["retry_after"] == 1

        # the engine core stops answering: the front end gives up about a second after the deadline
        with engine_paused(srv):
            ws.send(json.dumps({"type": "steps", **step, "id": 2}))
            r = httpx.post(f"{srv.url}{url}", json=step, timeout=30)
            assert r.status_code == 504 and r.headers["Retry-After"] == "1", r.text
            assert r.json()["error"]["code"] == "request_timeout" and "may or may not" in r.json()["error"]["message"]
            err = json.loads(ws.recv(timeout=30))
            assert err["error"]["code"] == "request_timeout" and err["error"]["retry_after"] == 1 and err["id"] == 2
        # both reached the engine core, which took them when it woke: a resend with start finds them applied
        deadline = time.monotonic() + 20
        while httpx.get(f"{srv.url}/v1/sessions/{sid}").json()["steps_seen"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(f"{srv.url}{url}", json={"steps": [[0.5, 0.5, 0.5]] * 2, "start": 2}, timeout=30)
        assert r.status_code == 200 and r.json()["replayed"] == 2 and r.json()["steps_seen"] == 4, r.text


def test_connection_limit_per_front_end(serve) -> None:
    srv = serve(max_connections=2)
    with ws_client.connect(srv.ws_url) as a, ws_client.connect(srv.ws_url) as b:
        for ws in (a, b):
            ws.send(json.dumps({"type": "open", "model": "sliding"}))
            assert json.loads(ws.recv(timeout=5))["type"] == "opened"
        with ws_client.connect(srv.ws_url) as c:
            err = json.loads(c.recv(timeout=5))
            assert err["type"] == "error" and err["error"]["code"] == "too_many_connections"
            assert err["error"]["retry_after"] == 1
            try:
                c.recv(timeout=5)
                raise AssertionError("the connection should have been closed")
            except ConnectionClosed as e:
                assert e.rcvd is not None and e.rcvd.code == 1013
        r = httpx.post(f"{srv.url}/v1/sessions", json={"model": "sliding"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections", r.text
        assert r.headers["Retry-After"] == "1"
        assert httpx.get(f"{srv.url}/healthz").status_code == 200  # probes are never refused
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
    deadline = time.monotonic() + 20  # the server notices the two closes on its own time
    while (r := httpx.post(f"{srv.url}/v1/sessions", json={"model": "sliding"})).status_code == 503:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)
    assert r.status_code == 201


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked client frame (RFC 6455)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    data = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)
    return head + mask + data.tobytes()


def send_until_dropped(sock: socket.socket) -> None:
    """On an accepted WebSocket ``sock``: open a session of "sliding", then send steps (~130 kB answers each) and
    never read: the server's buffers fill, then it must drop the connection (within 30 s); closes ``sock``."""
    sock.sendall(ws_frame(json.dumps({"type": "open", "model": "sliding"}).encode()))
    steps = ws_frame(json.dumps({"type": "steps", "steps": [[0.5, -0.5, 0.25]] * 1024}).encode())
    sock.settimeout(0.5)
    deadline = time.monotonic() + 30
    try:
        while True:
            assert time.monotonic() < deadline, "the server kept a client that does not read"
            try:
                sock.sendall(steps)
            except TimeoutError:
                pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        sock.close()


def test_a_client_that_stops_reading_is_disconnected(serve) -> None:
    srv = serve(ws_send_timeout_s=1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up soon
    sock.connect(("127.0.0.1", srv.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    send_until_dropped(sock)
    deadline = time.monotonic() + 10
    while "not reading" not in srv.log():
        assert time.monotonic() < deadline, srv.log()[-2000:]
        time.sleep(0.05)
    assert httpx.get(f"{srv.url}/healthz").status_code == 200


KEY_A, KEY_B = "gate-key-a-0123456789abcdef", "gate-key-b-0123456789abcdef"


def test_at_the_connection_limit_a_handshake_without_a_key_is_still_refused_401(serve) -> None:
    """The connection limit sat outside access control: at the limit a WebSocket handshake with no key (or from
    a foreign origin) was accepted (101) to be told the server was full, where docs/api.md says a handshake
    without a key is never accepted. It is refused for the key or origin first, full or not."""
    srv = serve(max_connections=1, api_keys=KEY_A)
    with ws_client.connect(srv.ws_url, additional_headers={"Authorization": f"Bearer {KEY_A}"}) as a:
        a.send(json.dumps({"type": "open", "model": "sliding"}))
        assert json.loads(a.recv(timeout=5))["type"] == "opened"
        for headers, status in (({}, 401), ({"Authorization": f"Bearer {KEY_A}", "Origin": "https://x.example"}, 403)):
            try:
                with ws_client.connect(srv.ws_url, additional_headers=headers):
                    raise AssertionError(f"accepted: {headers}")
            except websockets.exceptions.InvalidStatus as e:
                assert e.response.status_code == status, (headers, e.response.body)
        with ws_client.connect(srv.ws_url, additional_headers={"Authorization": f"Bearer {KEY_A}"}) as c:
            assert json.loads(c.recv(timeout=5))["error"]["code"] == "too_many_connections"
        assert httpx.post(f"{srv.url}/v1/sessions", json={"model": "sliding"}).status_code == 401




def test_a_full_session_is_refused_by_the_front_end_without_the_engine_or_the_body(serve) -> None:
    """Past PSN_SESSION_QUEUE unanswered requests of one session, the front end answers 429 itself: with the
    engine core stopped (it could not answer), and before a body that never arrives; per key; and the bound
    is released by answers and by errors alike."""
    srv = serve(session_queue=2, api_keys=f"{KEY_A},{KEY_B}")
    auth_a, auth_b = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
    sid = httpx.post(f"{srv.url}/v1/sessions", json={"model": "sliding"}, headers=auth_a).json()["session_id"]
    url, step = f"{srv.url}/v1/sessions/{sid}/steps", {"steps": [[0.5, 0.5, 0.5]]}

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30, headers=auth_a) as c, \
                websockets.connect(srv.ws_url, additional_headers=auth_a) as ws:
            await ws.send(json.dumps({"type": "attach", "session_id": sid}))
            assert json.loads(await ws.recv())["type"] == "attached"
            pid = engine_pid(srv)
            os.kill(pid, signal.SIGSTOP)
            try:
                held = [asyncio.create_task(c.post(url, json=step)) for _ in range(2)]
                other_key = asyncio.create_task(httpx.AsyncClient(timeout=30).post(url, json=step, headers=auth_b))
                await asyncio.sleep(0.5)
                assert not any(t.done() for t in (*held, other_key))
                r = await c.post(url, json=step)  # the engine core is stopped: only the front end can answer this
                assert r.status_code == 429 and r.headers["Retry-After"] == "1", r.text
                assert r.json()["error"]["code"] == "session_queue_full" and r.json()["error"]["field"] == "session_id"
                assert "2 requests" in r.json()["error"]["message"]
                # a body announced but never sent: answered from the head alone
                reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
                writer.write(f"POST /v1/sessions/{sid}/steps HTTP/1.1\r\nHost: localhost\r\n"
                             f"Authorization: Bearer {KEY_A}\r\n"
                             "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"steps\": [".encode())
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 429 "), head
                writer.close()
                # a WebSocket's steps message too
                await ws.send(json.dumps({"type": "steps", **step, "id": 7}))
                err = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert err["type"] == "error" and err["id"] == 7, err
                assert err["error"]["code"] == "session_queue_full" and err["error"]["retry_after"] == 1
                assert not any(t.done() for t in held)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert sorted([(await t).json()["start"] for t in held]) == [0, 1]
            r = await other_key  # another key's request is not counted against this key's: the engine says 404
            assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found", r.text
            # answers release the bound, and so do errors: more requests than the bound, one at a time
            for _ in range(3):
                r = await c.post(url, json={**step, "start": 99})
                assert r.status_code == 409 and r.json()["error"]["code"] == "step_gap", r.text
            for i in range(3):
                r = await c.post(url, json=step)
                assert r.status_code == 200 and r.json()["start"] == 2 + i, r.text

    asyncio.run(run())


def raw_post(port: int, path: str, headers: dict[str, str], body: bytes = b'{"steps": [[0.5, 0.5, 0.5]]}') -> bytes:
    """One request on a fresh connection, written in one piece; its answer's head and body as read."""
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "localhost", "Content-Type": "application/json",
                                                "Content-Length": str(len(body)), **headers}.items())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(65536)
        head_end = got.index(b"\r\n\r\n") + 4
        length = int(next(line.split(b":")[1] for line in got[:head_end].split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(got) < head_end + length:
            got += s.recv(65536)
        return got


def parse_answer(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_a_flood_of_a_full_session_is_refused_from_the_request_head_with_the_apps_own_answer(serve) -> None:
    """A full session's steps are refused by the front end's HTTP protocol (gate.py) with the answer the app
    gives (status, body, headers but the date); requests it leaves to the app (an Origin, a bad key, another
    key's session, requests that arrive together) are answered as before."""
    origin = "http://page.example"
    srv = serve(session_queue=2, api_keys=f"{KEY_A},{KEY_B}", allowed_origins=origin)
    auth_a = {"Authorization": f"Bearer {KEY_A}"}
    sid = httpx.post(f"{srv.url}/v1/sessions", json={"model": "sliding"}, headers=auth_a).json()["session_id"]
    path = f"/v1/sessions/{sid}/steps"

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30, headers=auth_a) as c:
            pid = engine_pid(srv)
            os.kill(pid, signal.SIGSTOP)
            try:
                # six requests that arrive together on six connections: two fit the bound, four are refused
                loop = asyncio.get_running_loop()
                burst = [loop.run_in_executor(None, raw_post, srv.port, path, auth_a) for _ in range(6)]
                done, held = await asyncio.wait(burst, timeout=3)
                assert len(done) == 4 and len(held) == 2, [t.result()[:60] for t in done]
                fast = [parse_answer(t.result()) for t in done]
                assert all(status == 429 and body["error"]["code"] == "session_queue_full" for status, _, body in fast)
                status, headers, body = fast[0]
                # the app's refusal of the same request (an Origin header: the app's CORS and Origin policy)
                app_status, app_headers, app_body = parse_answer(raw_post(srv.port, path, {**auth_a, "Origin": origin}))
                assert app_headers.get("access-control-allow-origin") == origin  # it did go through the app
                assert (status, body) == (app_status, app_body)
                common = {"content-type", "content-length", "retry-after", "server"}
                assert {k: headers[k] for k in common} == {k: app_headers[k] for k in common}
                cors = {"access-control-allow-origin", "access-control-expose-headers", "vary"}
                assert set(headers) == set(app_headers) - cors, (headers, app_headers)
                # a bad key or none: 401 from the app, never a 429 that says the session exists
                for bad in ({"Authorization": "Bearer not-a-key"}, {}):
                    s, _, b = parse_answer(raw_post(srv.port, path, bad))
                    assert s == 401 and b["error"]["code"] == "unauthorized", b
                # on a kept-alive connection the refusals keep coming, each answered, the connection usable
                for _ in range(3):
                    r = await c.post(f"{srv.url}{path}", json={"steps": [[0.5, 0.5, 0.5]]})
                    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
                r = await c.get(f"{srv.url}/v1/models")  # answered by the front end (the engine core is stopped)
                assert r.status_code == 200 and "sliding" in r.text, r.text
            finally:
                os.kill(pid, signal.SIGCONT)
            answered = [parse_answer(await t) for t in held]
            assert sorted(b["start"] for _, _, b in answered) == [0, 1], answered
            for i in range(3):  # nothing is left counted against the bound
                r = await c.post(f"{srv.url}{path}", json={"steps": [[0.5, 0.5, 0.5]]})
                assert r.status_code == 200 and r.json()["start"] == 2 + i, r.text

    asyncio.run(run())


def test_a_request_let_through_from_its_head_but_refused_by_the_app_frees_its_place(serve) -> None:
    """A steps request counts against its session's bound from its head until the app takes it; one the
    app refuses before that (PSN_MAX_CONNECTIONS: 503) must not stay counted, or the session would answer
    429 for ever."""
    srv = serve(session_queue=1, max_connections=2)
    busy = [open_session(srv) for _ in range(2)]
    sid = open_session(srv)
    step = b'{"steps": [[0.5, 0.5, 0.5]]}'

    async def run() -> None:
        loop = asyncio.get_running_loop()
        with engine_paused(srv):
            held = [loop.run_in_executor(None, raw_post, srv.port, f"/v1/sessions/{b}/steps", {}, step) for b in busy]
            await asyncio.sleep(1.0)  # both in flight: the front end's two places are taken
            status, _, body = parse_answer(await loop.run_in_executor(None, raw_post, srv.port,
                                                                      f"/v1/sessions/{sid}/steps", {}, step))
            assert status == 503 and body["error"]["code"] == "too_many_connections", body
        for t in held:
            assert parse_answer(await t)[0] == 200
        for i in range(3):
            status, _, body = parse_answer(await loop.run_in_executor(None, raw_post, srv.port,
                                                                      f"/v1/sessions/{sid}/steps", {}, step))
            assert status == 200 and body["start"] == i, body

    asyncio.run(run())
