"""The front end's refusal of a full session from the request head (service/frontend/gate.py) and the
HTTP protocol that asks it (protocols.py), driven directly: a real ``Frontend`` state, uvicorn's own
protocol class fed bytes through a recording transport, and an ASGI app that notes every request it gets.
Through the real server: tests/service/test_admission.py."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from service.config import Settings
from service.frontend.gate import FastRefusal
from service.frontend.limits import ADMITTED, release_admitted
from service.frontend.protocols import http_protocol
from service.frontend.state import Frontend
from service.metrics import FrontendMetrics

KEY_A, KEY_B = "gate-unit-key-a-0123456789", "gate-unit-key-b-0123456789"
DATE = [(b"date", b"Mon, 07 Dec 2026 00:00:00 GMT"), (b"server", b"uvicorn")]


def gate(**settings: Any) -> tuple[FastRefusal, Frontend]:
    s = Settings(session_queue=2, **settings)
    metrics = FrontendMetrics()
    frontend = Frontend(s, SimpleNamespace(on_hello=None, on_event=None), metrics, 0)
    app = SimpleNamespace(state=SimpleNamespace(frontend=frontend, metrics=metrics))
    return FastRefusal(app, s), frontend


def head(sid: str = "s1", key: str | None = None, **extra: bytes) -> dict[str, Any]:
    headers = [(b"host", b"x"), (b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    headers += [(k.encode(), v) for k, v in extra.items()]
    return {"type": "http", "headers": headers}


def ask(g: FastRefusal, scope: dict[str, Any], sid: str = "s1", method: bytes = b"POST",
        query: bytes = b"") -> bytes | None:
    return g.answer(method, f"/v1/sessions/{sid}/steps".encode() + query, scope, DATE)


def test_requests_seen_together_are_let_through_only_as_far_as_the_bound() -> None:
    g, fe = gate()
    scopes = [head() for _ in range(3)]
    assert [ask(g, s) is None for s in scopes] == [True, True, False]
    assert scopes[0][ADMITTED][1] == ("", "s1") and ADMITTED not in scopes[2]
    release_admitted(scopes[0])  # it reached the app (SessionGate) or ended
    release_admitted(scopes[0])  # once only
    assert fe.admitting == {("", "s1"): 1}
    fe.outstanding[("", "s1")] = 1  # ... and the app sent it to the engine core
    assert ask(g, head()) is not None  # 1 unanswered + 1 let through: full
    del fe.outstanding[("", "s1")]
    assert ask(g, head(), query=b"?x=1") is None  # the query does not change the path
    assert ask(g, head(), sid="s2") is None  # another session has its own bound


def test_the_refusal_is_the_apps_answer_and_counted() -> None:
    g, fe = gate()
    fe.outstanding[("", "s1")] = 2
    raw = ask(g, head())
    assert raw is not None
    status_line, _, rest = raw.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status_line == b"HTTP/1.1 429 Too Many Requests"
    fields = dict(line.split(b": ", 1) for line in headers.split(b"\r\n"))
    assert fields == {b"date": DATE[0][1], b"server": b"uvicorn", b"content-type": b"application/json",
                      b"content-length": str(len(body)).encode(), b"retry-after": b"1"}
    err = json.loads(body)["error"]
    assert err["code"] == "session_queue_full" and err["field"] == "session_id" and "2 requests" in err["message"]
    assert ask(g, head()) == raw  # the same answer, kept for the flood
    fe.outstanding[("", "s1")] = 3  # one more came in by the app's way: the answer says how many wait now
    assert "3 requests" in json.loads(ask(g, head()).partition(b"\r\n\r\n")[2])["error"]["message"]
    fe.outstanding[("", "s1")] = 2
    later = [(b"date", b"Mon, 07 Dec 2026 00:00:01 GMT"), DATE[1]]  # uvicorn's next list, a second later
    assert g.answer(b"POST", b"/v1/sessions/s1/steps", head(), later) == raw.replace(DATE[0][1], later[0][1])
    errors = g.app.state.metrics.errors.labels("session_queue_full")._value.get()
    assert errors == 4


@pytest.mark.parametrize("case", ["GET", "other path", "percent-encoded id", "nested", "no id", "origin",
                                  "no frontend yet"])
def test_what_the_gate_leaves_to_the_app(case: str) -> None:
    g, fe = gate()
    fe.outstanding[("", "s1")] = fe.outstanding[("", "")] = 2  # no id: the app answers 404, never 429
    fe.outstanding[("", "a%2Fb")] = fe.outstanding[("", "a/b")] = 2
    scope = head(origin=b"http://page.example") if case == "origin" else head()
    if case == "no frontend yet":
        g.app.state.frontend = None
    url = {"other path": b"/v1/sessions/s1", "percent-encoded id": b"/v1/sessions/a%2Fb/steps",
           "nested": b"/v1/sessions/a/b/steps", "no id": b"/v1/sessions//steps"}.get(case, b"/v1/sessions/s1/steps")
    assert g.answer(b"GET" if case == "GET" else b"POST", url, scope, DATE) is None
    assert ADMITTED not in scope


def test_keys_each_owner_its_own_bound_and_a_bad_key_is_the_apps() -> None:
    g, fe = gate(api_keys=f"{KEY_A},{KEY_B}")
    a = g.keys.owner(KEY_A)
    fe.outstanding[(a, "s1")] = 2
    assert ask(g, head(key=KEY_A)) is not None
    assert ask(g, head(key=KEY_B)) is None  # another key's session of that id (the engine says 404)
    for bad in (head(key="not-a-key"), head(), head(authorization=f"Basic {KEY_A}".encode())):
        assert ask(g, bad) is None and ADMITTED not in bad  # 401 from the app, not a 429 that says it exists


class Transport(asyncio.Transport):
    """Records what the protocol writes."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def post(sid: str, body: bytes = b'{"steps": [[1.0]]}', chunked: bool = False) -> bytes:
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n\r\n"
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        framing = b"Content-Length: %d\r\n\r\n" % len(body)
    return b"POST /v1/sessions/%s/steps HTTP/1.1\r\nHost: localhost\r\n%s%s" % (sid.encode(), framing, body)


def connect(app: Any, g: FastRefusal, state: ServerState | None = None,
            log_level: str = "warning") -> tuple[Any, Transport]:
    """uvicorn's HTTP protocol as the front end runs it (the head gate ``g``) over a fake transport, connected."""
    config = uvicorn.Config(app, log_level=log_level)
    config.load()
    protocol = http_protocol(1 << 15, g.answer)(config=config, server_state=state or ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport


async def settle(turns: int = 20) -> None:
    """Let the app's tasks run (each await is one turn of the loop)."""
    for _ in range(turns):
        await asyncio.sleep(0)


def refusing_app(seen: list[str]) -> Any:
    """An app that records each request's path and answers it 429, as its own gate would a full session."""
    async def app(scope: dict, receive: Any, send: Any) -> None:
        await receive()
        release_admitted(scope)
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 429, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def test_the_protocol_answers_a_refused_request_without_the_app_and_keeps_the_connection() -> None:
    g, fe = gate()
    fe.outstanding[("", "full")] = 2
    seen: list[tuple[str, bytes]] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            msg = await receive()
            body, more = body + msg.get("body", b""), msg.get("more_body", False)
        release_admitted(scope)
        seen.append((scope["path"], body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run() -> None:
        state = ServerState()
        protocol, transport = connect(app, g, state)
        # refused, refused (chunked body), then one for another session, all in one read: the app sees only the last
        protocol.data_received(post("full") + post("full", chunked=True) + post("free"))
        await settle()
        assert seen == [("/v1/sessions/free/steps", b'{"steps": [[1.0]]}')]
        answers = bytes(transport.out).split(b"HTTP/1.1 ")[1:]
        assert [a[:3] for a in answers] == [b"429", b"429", b"200"] and not transport.closed
        assert fe.admitting == {} and state.total_requests == 3
        # a refused request whose body comes later, in pieces: answered from its head, its body dropped
        transport.out.clear()
        whole = post("full", body=b'{"steps": [[1.0], [2.0], [3.0]]}')
        cut = whole.index(b"\r\n\r\n") + 4
        protocol.data_received(whole[:cut])
        assert transport.out.startswith(b"HTTP/1.1 429 ")
        assert protocol.timeout_keep_alive_task is not None  # an idle connection is closed in time, as after any answer
        protocol.data_received(whole[cut:cut + 5])
        protocol.data_received(whole[cut + 5:] + post("free", body=b'{"steps": [[4.0]]}'))
        await settle()
        assert seen[-1] == ("/v1/sessions/free/steps", b'{"steps": [[4.0]]}') and len(seen) == 2
        protocol.connection_lost(None)

    asyncio.run(run())


@pytest.mark.parametrize("request_bytes", [
    post("full").replace(b"Host: localhost\r\n", b"Host: localhost\r\nExpect: 100-continue\r\n"),  # maybe never sent
    post("full").replace(b"Host: localhost\r\n", b"Host: localhost\r\nConnection: close\r\n"),  # closed after it
    post("full").replace(b"HTTP/1.1\r\nHost: localhost\r\n",
                         b"HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n"),
    post("full").replace(b"Host: localhost\r\n", b"Host: localhost\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"),
], ids=["expect 100-continue", "connection close", "HTTP/1.0 keep-alive", "upgrade"])
def test_only_a_plain_keep_alive_request_is_answered_from_its_head(request_bytes: bytes) -> None:
    """Anything else is the app's to answer (uvicorn then sends 100 Continue, closes the connection, or answers
    as HTTP/1.0 asks), even for a full session."""
    g, fe = gate()
    fe.outstanding[("", "full")] = 2
    seen: list[str] = []

    async def run() -> None:
        protocol, transport = connect(refusing_app(seen), g)
        protocol.data_received(request_bytes)
        await settle()
        assert seen == ["/v1/sessions/full/steps"] and b" 429 " in bytes(transport.out)
        protocol.connection_lost(None)

    asyncio.run(run())


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_request_refused_from_its_head_is_in_the_access_log_as_the_apps_answers_are() -> None:
    g, fe = gate()
    fe.outstanding[("", "full")] = 2

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await receive()
        release_admitted(scope)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run() -> list[str]:
        protocol, _ = connect(app, g, log_level="info")  # first: its config sets logging up afresh
        access = logging.getLogger("uvicorn.access")
        records = Records()
        access.addHandler(records)
        try:
            protocol.data_received(post("full") + post("free"))
            await settle()
            protocol.connection_lost(None)
        finally:
            access.removeHandler(records)
        return records.lines

    assert asyncio.run(run()) == ['127.0.0.1:5000 - "POST /v1/sessions/full/steps HTTP/1.1" 429',
                                  '127.0.0.1:5000 - "POST /v1/sessions/free/steps HTTP/1.1" 200']


def test_a_request_behind_one_still_being_answered_is_left_in_order() -> None:
    """Pipelined behind a request the app is still answering, a refusable request waits its turn (its
    answer must not overtake the earlier one's)."""
    g, fe = gate()
    fe.outstanding[("", "full")] = 2
    order: list[str] = []

    async def run() -> None:
        gate_open = asyncio.Event()

        async def app(scope: dict, receive: Any, send: Any) -> None:
            await receive()
            if scope["path"].endswith("/slow/steps"):
                await gate_open.wait()
            order.append(scope["path"])
            body = b"{}"
            status = 200
            if scope["path"].endswith("/full/steps"):  # the app's own gate would refuse it
                status = 429
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})

        protocol, transport = connect(app, g)
        protocol.data_received(post("slow") + post("full"))
        await settle(10)
        assert transport.out == b""  # nothing may be answered before the slow request
        gate_open.set()
        await settle()
        assert order == ["/v1/sessions/slow/steps", "/v1/sessions/full/steps"]
        assert [a[:3] for a in bytes(transport.out).split(b"HTTP/1.1 ")[1:]] == [b"200", b"429"]
        protocol.connection_lost(None)

    asyncio.run(run())


def test_a_client_that_does_not_read_its_answers_gets_no_answers_written_from_the_head() -> None:
    """While uvicorn's write buffer is over its high-water mark (the client does not read), refusable requests
    are left to the app, whose answers wait for the buffer to drain: answering them from their heads would
    grow the buffer without bound."""
    g, fe = gate()
    fe.outstanding[("", "full")] = 2
    seen: list[str] = []

    async def run() -> None:
        protocol, transport = connect(refusing_app(seen), g)
        protocol.pause_writing()  # what the transport calls when its buffer passes the high-water mark
        protocol.data_received(post("full"))
        await settle()
        assert transport.out == b"" and seen == ["/v1/sessions/full/steps"]  # the app's answer waits
        protocol.resume_writing()
        await settle()
        assert bytes(transport.out).startswith(b"HTTP/1.1 429")
        protocol.connection_lost(None)

    asyncio.run(run())
