"""WS /v1/stream at its edges, against the real service (one front-end worker, a small message limit): a
message of exactly PSN_MAX_REQUEST_BYTES is read and one byte more is refused unparsed, a closed session
is gone from the connection, attach chooses the frames, an empty ?session_id= routes nothing, and errors
and connections are counted in /metrics. A sweep of one-line mutations of
service/frontend/routes/stream.py found each of these let through by the rest of the suite."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from service.frontend.worker import ws_max_size
from tests.service.conftest import DEFAULTS, Reference, Server, assert_outputs

L_AT_LIMIT = 170
LIMIT = 16 + 12 * L_AT_LIMIT  # a binary frame of 170 steps of the sliding model (3 floats) is exactly the limit


@pytest.fixture(scope="module")
def small(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server({**DEFAULTS, "model_dir": model_dir, "max_request_bytes": LIMIT},
                 tmp_path_factory.mktemp("small")).start()
    yield srv
    srv.stop()


def _ask(ws, msg) -> dict:
    ws.send(msg if isinstance(msg, str | bytes) else json.dumps(msg))
    return json.loads(ws.recv(timeout=10))


def _open(ws, model: str = "sliding", **extra) -> str:
    msg = _ask(ws, {"type": "open", "model": model, **extra})
    assert msg["type"] == "opened", msg
    return msg["session"]["session_id"]


def _padded(msg: dict, size: int) -> str:
    """``msg`` as JSON text of exactly ``size`` characters (trailing whitespace is still JSON)."""
    text = json.dumps(msg)
    assert len(text) <= size
    return text + " " * (size - len(text))


def test_a_message_of_exactly_the_limit_is_read_and_one_more_is_refused_unparsed(small: Server,
                                                                                  ref: Reference) -> None:
    x = ref.sequence("sliding", 8, seed=80)
    with connect(small.ws_url) as ws:
        _open(ws)
        r = _ask(ws, _padded({"type": "steps", "steps": x[:4].tolist(), "id": 1}, LIMIT))
        assert r["type"] == "steps" and r["id"] == 1 and r["start"] == 0, r
        err = _ask(ws, _padded({"type": "steps", "steps": x[4:].tolist(), "id": 2}, LIMIT + 1))
        assert err["error"]["code"] == "request_too_large" and err["error"]["field"] == "message", err
        assert err["id"] is None  # never parsed, not even for its id
        r = _ask(ws, {"type": "steps", "steps": x[4:].tolist()})  # the refused steps were not applied
        assert r["start"] == 4
        assert_outputs(r["outputs"], ref.outputs("sliding", x), start=4)
    with connect(small.ws_url, subprotocols=["psn.binary.v1"]) as ws:
        _open(ws)
        steps = np.zeros((L_AT_LIMIT, 3), "<f4")
        ws.send(struct.pack("<IIq", 3, L_AT_LIMIT, -1) + steps.tobytes())  # exactly the limit: answered
        assert struct.unpack_from("<IIq", ws.recv(timeout=10)) == (3, L_AT_LIMIT, 0)
        err = _ask(ws, struct.pack("<IIq", 4, L_AT_LIMIT, -1) + steps.tobytes() + b"\0")
        assert err["error"]["code"] == "request_too_large" and err["id"] == 4, err


def test_the_frame_limit_is_twice_the_request_limit_and_at_least_4_mib() -> None:
    """docs/api.md: a message between PSN_MAX_REQUEST_BYTES and the larger of 4 MiB and twice it is read and
    answered request_too_large on a connection that stays; past that it is closed with 1009."""
    assert ws_max_size(1_000_000) == 4 << 20 and ws_max_size(3_000_000) == 6_000_000


def test_no_compression_unless_ws_compression_is_on(small: Server) -> None:
    """PSN_WS_COMPRESSION is off by default: a client offering permessage-deflate (websockets' client does by
    default) is answered without it."""
    with connect(small.ws_url) as ws:
        assert "permessage-deflate" in ws.request.headers.get("Sec-WebSocket-Extensions", "")
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None


def test_after_close_the_connection_has_no_session(small: Server, ref: Reference) -> None:
    """Steps after close are refused by the connection (no session: open or attach first), not sent to
    the closed session; the connection then opens a new one."""
    x = ref.sequence("sliding", 3, seed=81)
    with connect(small.ws_url) as ws:
        sid = _open(ws)
        assert _ask(ws, {"type": "close"}) == {"type": "closed", "session_id": sid}
        err = _ask(ws, {"type": "steps", "steps": x.tolist(), "id": 5})
        assert err["error"]["code"] == "invalid_input" and err["error"]["field"] == "type", err
        assert "no session on this connection" in err["error"]["message"] and err["id"] == 5
        err = _ask(ws, {"type": "close"})
        assert err["error"]["code"] == "invalid_input" and err["error"]["field"] == "type", err
        _open(ws)
        assert_outputs(_ask(ws, {"type": "steps", "steps": x.tolist()})["outputs"], ref.outputs("sliding", x))


def test_attach_chooses_the_frames(small: Server, ref: Reference) -> None:
    """"frames" on attach switches the connection, as on open: binary on a JSON connection, JSON on a
    psn.binary.v1 connection; the steps continue the session either way."""
    x = ref.sequence("sliding", 6, seed=82)
    spikes, scores = ref.outputs("sliding", x)
    with httpx.Client(base_url=small.url, timeout=20) as c:
        sid = c.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
    with connect(small.ws_url) as ws:
        assert _ask(ws, {"type": "attach", "session_id": sid, "frames": "binary"})["type"] == "attached"
        ws.send(struct.pack("<IIq", 7, 3, -1) + x[:3].numpy().astype("<f4").tobytes())
        data = ws.recv(timeout=10)
        assert isinstance(data, bytes), data
        msg_id, L, start, replayed, n_out, classes, nb = struct.unpack_from("<IIqIIII", data)
        assert (msg_id, L, start, replayed, classes) == (7, 3, 0, 0, 4)
        got = np.frombuffer(data, "<f4", L * classes, 32).reshape(L, classes)
        assert got == pytest.approx(np.asarray(scores[:3]), rel=1e-6, abs=1e-6)
    with connect(small.ws_url, subprotocols=["psn.binary.v1"]) as ws:
        assert _ask(ws, {"type": "attach", "session_id": sid, "frames": "json"})["type"] == "attached"
        r = _ask(ws, {"type": "steps", "steps": x[3:].tolist()})
        assert r["type"] == "steps" and r["start"] == 3, r
        assert_outputs(r["outputs"], (spikes, scores), start=3)


def test_an_empty_session_id_in_the_url_routes_nothing(small: Server) -> None:
    with httpx.Client(base_url=small.url, timeout=20) as c:
        sid = c.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
    with connect(f"{small.ws_url}?session_id=") as ws:
        assert _ask(ws, {"type": "attach", "session_id": sid})["type"] == "attached"


@pytest.mark.parametrize("query", ["session_id=a&session_id=b", "session_id=b&session_id=", "session_id=&session_id=b"])
def test_a_url_naming_session_id_twice_is_refused_before_the_handshake(small: Server, query: str) -> None:
    """Ray's router and HAProxy's url_param route a connection by the first session_id, while the connection
    was pinned to the last (or to none, for an empty last one): the session then ran on a replica its other
    requests were not routed to. A second session_id is refused with 400 in the API's shape."""
    try:
        with connect(f"{small.ws_url}?{query}"):
            raise AssertionError("accepted")
    except InvalidStatus as e:
        r = e.response
    err = json.loads(r.body)["error"]
    assert r.status_code == 400 and err["code"] == "bad_request" and err["field"] == "session_id", r.body
    assert "more than one session_id" in err["message"]


def _metric(c: httpx.Client, line: str) -> float:
    m = re.search(rf"^{re.escape(line)} (\S+)$", c.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def _until(c: httpx.Client, line: str, value: float) -> None:
    deadline = time.monotonic() + 10
    while (got := _metric(c, line)) != value:
        assert time.monotonic() < deadline, f"{line} is {got}, not {value}"
        time.sleep(0.05)


@pytest.mark.parametrize(("headers", "named"), [
    (b"Sec-WebSocket-Version: 13\r\n", "Sec-WebSocket-Key"),  # no key
    (b"Sec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n", "Sec-WebSocket-Key"),  # 5 bytes, not 16
    (b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n", "Sec-WebSocket-Version"),
    (b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 13\r\n",
     "Sec-WebSocket-Version"),
    # one websockets cannot read: the reason named is the one under its "did not receive a valid HTTP request"
    (b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nTransfer-Encoding: chunked\r\n",
     "transfer codings"),
])
def test_a_handshake_websockets_refuses_is_a_400_in_the_apis_shape(small: Server, headers: bytes, named: str) -> None:
    """A handshake that parses but is not a valid WebSocket opening got the websockets library's plain-text 400
    ("Failed to open a WebSocket connection: ..."), where every other refusal is {"error": {...}}."""
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as s:
        s.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  + headers + b"\r\n")
        answer = b""
        while data := s.recv(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), answer
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and error["field"] == "request" and named in error["message"], error


def _raw_answer(srv: Server, request: bytes) -> tuple[bytes, dict]:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(request)
        answer = b""
        while data := s.recv(65536):
            answer += data
            if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                break
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.lower(), json.loads(body)["error"]


def test_a_handshake_by_another_method_is_a_405_in_the_apis_shape_allowing_get(small: Server) -> None:
    """websockets answered a POST handshake with its own plain-text 405."""
    head, error = _raw_answer(small, b"POST /v1/stream HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                              b"Sec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n")
    assert head.startswith(b"http/1.1 405") and b"content-type: application/json" in head, head
    assert b"\r\nallow: get" in head, head
    assert error["code"] == "method_not_allowed" and error["field"] == "method" and "GET" in error["message"]


def test_plain_http_to_the_websocket_endpoint_is_told_to_upgrade(small: Server) -> None:
    """curl or a browser's address bar on /v1/stream got 404 not_found, as if the path did not exist."""
    with httpx.Client(base_url=small.url, timeout=20) as c:
        r = c.get("/v1/stream")
        assert r.status_code == 426 and r.headers["upgrade"] == "websocket", r.text
        error = r.json()["error"]
        assert error["code"] == "upgrade_required" and error["field"] == "Upgrade"
        assert "WebSocket" in error["message"] and "ws://" in error["message"]
        r = c.post("/v1/stream", json={})
        assert r.status_code == 405 and "GET" in r.headers["allow"], r.text
    with connect(small.ws_url) as ws:  # the WebSocket itself is unchanged
        assert _ask(ws, {"type": "open", "model": "sliding"})["type"] == "opened"


def test_errors_and_connections_are_counted(small: Server) -> None:
    """A WebSocket error is counted in psn_errors_total by its code, as over HTTP; psn_ws_connections
    counts the connections open now."""
    with httpx.Client(base_url=small.url, timeout=20) as c:
        _until(c, "psn_ws_connections", 0)  # every earlier test's connection is closed by now
        before = _metric(c, 'psn_errors_total{code="model_not_found"}')
        with connect(small.ws_url) as a, connect(small.ws_url) as b:
            for ws in (a, b):
                assert _ask(ws, {"type": "open", "model": "nope"})["error"]["code"] == "model_not_found"
            assert _metric(c, 'psn_errors_total{code="model_not_found"}') == before + 2
            _until(c, "psn_ws_connections", 2)
        _until(c, "psn_ws_connections", 0)


def test_the_send_watchdog_drops_only_sends_that_waited_past_the_timeout() -> None:
    """``SendWatchdog``, with connections whose send is stuck (long past the timeout), under way (a client
    that reads, just not yet) and idle: only the stuck one is dropped, once, and the task ends with them."""
    import asyncio

    from service.frontend.routes.stream import SendWatchdog

    class Conn:
        def __init__(self, age: float | None) -> None:
            self.age, self.dropped = age, []

        def drop(self, waited: float) -> None:
            self.dropped.append(waited)

    async def run() -> None:
        now = asyncio.get_running_loop().time()
        dog = SendWatchdog(timeout_s=2.0)  # looks every 0.25 s
        stuck, busy, idle = Conn(5.0), Conn(0.05), Conn(None)
        for conn in (stuck, busy, idle):
            conn.sending_since = None if conn.age is None else now - conn.age
            dog.add(conn)
        await asyncio.sleep(0.4)  # one look: busy's send has waited about 0.3 s of its 2
        assert len(stuck.dropped) == 1 and stuck.dropped[0] > 5.0
        assert busy.dropped == [] and idle.dropped == []
        assert dog.conns == {busy, idle}  # a dropped connection is no longer watched
        busy.sending_since = None  # its send went through
        dog.conns.clear()
        await asyncio.wait_for(dog.task, 1)  # nothing left to watch: the task ends

    asyncio.run(run())


def test_a_close_of_a_session_closed_elsewhere_is_410_and_leaves_no_session(small: Server, ref: Reference) -> None:
    """Closing a session another connection has closed is refused 410 session_closed, and the connection
    holds no session after it (docs/api.md): the next steps are 422 naming type, not 410 again."""
    x = ref.sequence("sliding", 2, seed=82)
    with connect(small.ws_url) as a, connect(small.ws_url) as b:
        sid = _open(a)
        assert _ask(b, {"type": "attach", "session_id": sid})["type"] == "attached"
        assert _ask(b, {"type": "close"}) == {"type": "closed", "session_id": sid}
        err = _ask(a, {"type": "close"})
        assert err["error"]["code"] == "session_closed", err
        err = _ask(a, {"type": "steps", "steps": x.tolist()})
        assert err["error"]["code"] == "invalid_input" and err["error"]["field"] == "type", err
        _open(a)


def test_a_close_refused_for_now_keeps_the_session_on_the_connection(serve, ref: Reference) -> None:
    """A close the engine core refuses for now (429 session_queue_full: another connection's steps fill the
    session's queue) leaves the session on the connection, so the close can be sent again once they are
    answered. It used to drop it first: the retried close was 422 "no session on this connection", the
    session stayed open, and the connection no longer heard of its expiry."""
    srv = serve(session_queue=1)
    x = ref.sequence("sliding", 4, seed=72)
    with connect(srv.ws_url) as a, connect(srv.ws_url) as b, httpx.Client(base_url=srv.url, timeout=20) as h:
        pid = h.get("/healthz").json()["engine_pid"]
        for _ in range(5):  # the steps and the close reach the paused engine core together: the close finds it busy
            sid = _open(a)
            assert _ask(b, {"type": "attach", "session_id": sid})["type"] == "attached"
            os.kill(pid, signal.SIGSTOP)
            try:
                b.send(json.dumps({"type": "steps", "steps": x.tolist()}))
                time.sleep(0.2)
                a.send(json.dumps({"type": "close"}))
                time.sleep(0.2)
            finally:
                os.kill(pid, signal.SIGCONT)
            first = json.loads(a.recv(timeout=10))
            steps = json.loads(b.recv(timeout=10))
            assert steps["type"] == "steps", steps
            assert_outputs(steps["outputs"], ref.outputs("sliding", x))
            if first["type"] == "error":
                break
            assert first["type"] == "closed", first
        assert first["error"]["code"] == "session_queue_full" and first["error"]["retry_after"] >= 1, first
        assert h.get(f"/v1/sessions/{sid}").json()["steps_seen"] == 4
        assert _ask(a, {"type": "close"}) == {"type": "closed", "session_id": sid}
        assert h.get(f"/v1/sessions/{sid}").json()["error"]["code"] == "session_closed"
