"""The front end's own parts without a server: its state (``Frontend``: the per-session bound on steps
requests, the session -> model cache, who watches what), the ASGI middleware of limits.py
(``ConnectionLimit``, ``SessionGate``, ``BodyLimit``, ``SlowReaders``) and the pieces of auth.py, each
driven directly with a fake engine core, scripted ASGI messages and a recording transport. Through the real
server: test_admission.py, test_auth.py, test_overload.py; from the request head: test_gate.py."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from service.config import Settings
from service.errors import ModelNotFound, NotReady, SessionNotFound, SessionQueueFull
from service.frontend import auth
from service.frontend.auth import AccessControl, KeyRing, bearer_key
from service.frontend.limits import ADMITTED, OWNER, BodyLimit, ConnectionLimit, SessionGate, SlowReaders
from service.frontend.state import INTERNAL_INFO, Frontend
from service.metrics import FrontendMetrics

MODEL = {"name": "m", "input_shape": [2], "output_shape": [3], "num_classes": 3, "class_names": ["a", "b", "c"],
         "wire_dtype": "<f4", "model_dtype": "float32"}


class FakeEngine:
    """The engine client as ``Frontend`` sees it: every call is recorded with its future; ``get`` is answered
    at once from ``sessions`` ((owner, id) -> model; else 404), the rest by the test."""

    def __init__(self) -> None:
        self.on_hello: Any = None
        self.on_event: Any = None
        self.connected = True
        self.sessions: dict[tuple[str, str], str] = {}
        self.calls: list[tuple[str, tuple, asyncio.Future]] = []

    def call(self, method: str, *args: Any) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.calls.append((method, args, fut))
        if method == "get":
            sid, _watch, owner = args
            model = self.sessions.get((owner, sid))
            if model is None:
                fut.set_exception(SessionNotFound(f"no session {sid!r}"))
            else:
                fut.set_result({"session_id": sid, "model": model})
        return fut

    def asked(self, method: str) -> list[tuple]:
        return [args for m, args, _ in self.calls if m == method]


def frontend(session_queue: int = 2) -> tuple[Frontend, FakeEngine]:
    engine = FakeEngine()
    fe = Frontend(Settings(session_queue=session_queue), engine, FrontendMetrics(), 0)
    engine.on_hello({"models": [MODEL]})
    return fe, engine


# ----- Frontend: the bound on one session's unanswered steps requests ------------------------------
def test_requests_let_through_from_the_head_count_with_the_unanswered_ones() -> None:
    fe, _ = frontend(session_queue=2)
    fe.outstanding[("a", "s1")] = 1
    assert fe.queue_full("s1", "a") is None
    err = fe.queue_full("s1", "a", ahead=1)  # one unanswered + one let through: the bound
    assert err is not None and "2 requests" in err.message  # the refusal says how many wait, ahead included
    assert fe.queue_full("s1", "b", ahead=1) is None  # another owner's session of that id


def test_steps_count_against_the_bound_until_answered_or_failed() -> None:
    async def run() -> None:
        fe, engine = frontend(session_queue=2)
        codec = fe.codec("m")
        first = asyncio.create_task(fe.steps("s1", codec, None, 1, b"p", "a"))
        second = asyncio.create_task(fe.steps("s1", codec, 5, 1, b"q", "a"))
        await asyncio.sleep(0)
        assert engine.asked("steps") == [("s1", -1, 1, b"p", "a"), ("s1", 5, 1, b"q", "a")]  # None: append
        assert fe.outstanding == {("a", "s1"): 2}
        with pytest.raises(SessionQueueFull):  # refused here, the engine core is not asked
            await asyncio.wait_for(fe.steps("s1", codec, None, 1, b"p", "a"), 1)
        assert len(engine.calls) == 2
        engine.calls[0][2].set_result(["answer"])
        assert await first == ["answer"]
        assert fe.outstanding == {("a", "s1"): 1}
        engine.calls[1][2].set_exception(SessionNotFound("gone"))  # an error frees the place too
        with pytest.raises(SessionNotFound):
            await second
        assert fe.outstanding == {}
        third = asyncio.create_task(fe.steps("s1", codec, None, 1, b"r", "a"))
        await asyncio.sleep(0)
        assert len(engine.calls) == 3 and fe.outstanding == {("a", "s1"): 1}
        engine.calls[2][2].set_result(["again"])
        assert await third == ["again"]
        assert fe.metrics.latency("m")._sum.get() > 0  # the round trips were timed

    asyncio.run(run())


# ----- Frontend: models, codecs, the session -> model cache ------------------------------------------
def test_models_are_public_info_and_an_unknown_or_unhashable_name_is_404() -> None:
    fe, engine = frontend()
    assert fe.models == {"m": {k: v for k, v in MODEL.items() if k not in INTERNAL_INFO}}
    assert not set(INTERNAL_INFO) & set(fe.models["m"])
    assert fe.codec("m").name == "m"
    for name in ("nope", ["m"], {"m": 1}, None):
        with pytest.raises(ModelNotFound):
            fe.codec(name)
    engine.connected = False  # the engine core restarts
    with pytest.raises(NotReady):
        fe.codec("m")


def test_a_sessions_model_is_asked_once_per_owner() -> None:
    async def run() -> None:
        fe, engine = frontend()
        engine.sessions[("a", "s1")] = "m"
        assert (await fe.session_codec("s1", "a")).name == "m"
        assert (await fe.session_codec("s1", "a")).name == "m"
        assert engine.asked("get") == [("s1", False, "a")]  # remembered
        with pytest.raises(SessionNotFound):  # another key's request about it: the engine core answers (404)
            await fe.session_codec("s1", "b")
        assert engine.asked("get") == [("s1", False, "a"), ("s1", False, "b")]

    asyncio.run(run())


KEPT = 100_000  # sessions whose model state.py remembers (Frontend.remember)


def test_the_session_cache_forgets_the_least_recently_remembered() -> None:
    async def run() -> None:
        fe, engine = frontend()
        ids = ["old0", "old1", *(f"s{i}" for i in range(KEPT - 2))]
        for sid in ids:
            fe.remember({"session_id": sid, "model": "m"}, "a")
        fe.remember({"session_id": "old0", "model": "m"}, "a")  # seen again: the newest
        fe.remember({"session_id": "new", "model": "m"}, "a")  # one past the bound: old1 goes
        for sid in ("old0", "s0", "new", "old1"):  # (old1 last: asking remembers it, and one more goes)
            engine.sessions[("a", sid)] = "m"
            await fe.session_codec(sid, "a")
        assert engine.asked("get") == [("old1", False, "a")]

    asyncio.run(run())


# ----- Frontend: who watches what ------------------------------------------------------------------
def test_watchers_hear_their_session_and_a_restarted_engine_is_told_again() -> None:
    async def run() -> None:
        fe, engine = frontend()
        heard: list[tuple[str, str, str]] = []

        def one(kind: str, sid: str) -> None:
            heard.append(("one", kind, sid))

        def two(kind: str, sid: str) -> None:
            heard.append(("two", kind, sid))

        fe.watch("s1", "a", one)
        fe.watch("s1", "a", two)
        fe.watch("s2", "b", one)
        engine.on_event("expired", "s1")
        assert sorted(heard) == [("one", "expired", "s1"), ("two", "expired", "s1")]
        engine.on_hello({"models": [MODEL]})  # a restarted engine core must learn who watches what
        assert sorted(engine.asked("get")) == [("s1", True, "a"), ("s2", True, "b")]
        await asyncio.sleep(0)  # their answers (404 here) are consumed
        fe.unwatch("s1", one)  # the other watcher of s1 still hears it
        assert fe.watchers == {"s1": {two}, "s2": {one}} and fe.watched_owner == {"s1": "a", "s2": "b"}
        heard.clear()
        engine.on_event("expired", "s1")
        assert heard == [("two", "expired", "s1")]
        fe.unwatch("s1", two)
        fe.unwatch("s1", two)  # twice: nothing more
        assert fe.watchers == {"s2": {one}} and fe.watched_owner == {"s2": "b"}
        engine.calls.clear()
        engine.on_hello({"models": [MODEL]})
        assert engine.asked("get") == [("s2", True, "b")]
        await asyncio.sleep(0)

    asyncio.run(run())


# ----- ASGI helpers ---------------------------------------------------------------------------------
class Sent(list):
    """An ASGI ``send`` that records the messages."""

    async def __call__(self, message: dict) -> None:
        self.append(message)

    def status(self) -> int | None:
        return next((m["status"] for m in self if m["type"] == "http.response.start"), None)

    def json(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self if m["type"] == "http.response.body"))


def receiving(*messages: dict) -> Any:
    """An ASGI ``receive`` that gives ``messages`` in turn, then waits for ever."""
    queue = list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


def http(path: str, method: str = "GET", headers: list | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "headers": headers or [], **extra}


# ----- ConnectionLimit -----------------------------------------------------------------------------
def test_the_connection_limit_counts_requests_in_flight_and_lets_probes_through() -> None:
    async def run() -> None:
        release = asyncio.Event()

        async def app(scope: dict, receive: Any, send: Any) -> None:
            if scope["path"] == "/fail":
                raise RuntimeError("the app failed")
            if scope["path"] != "/healthz":
                await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        limit = ConnectionLimit(app, 2)
        held = [asyncio.create_task(limit(http("/v1/models"), receiving(), Sent())) for _ in range(2)]
        await asyncio.sleep(0)
        assert limit.active == 2
        refused = Sent()
        await asyncio.wait_for(limit(http("/v1/models"), receiving(), refused), 1)
        assert refused.status() == 503 and refused.json()["error"]["code"] == "too_many_connections"
        assert (b"retry-after", b"1") in refused[0]["headers"]
        probe = Sent()
        await limit(http("/healthz"), receiving(), probe)  # never refused
        assert probe.status() == 200
        ws = Sent()  # a WebSocket past the limit: accepted, told why, closed with 1013 (try again later)
        await limit({"type": "websocket", "path": "/v1/stream", "headers": []},
                    receiving({"type": "websocket.connect"}), ws)
        assert [m["type"] for m in ws] == ["websocket.accept", "websocket.send", "websocket.close"]
        assert json.loads(ws[1]["text"])["error"]["code"] == "too_many_connections" and ws[2]["code"] == 1013
        release.set()
        await asyncio.gather(*held)
        assert limit.active == 0
        with pytest.raises(RuntimeError):  # a failed request gives its place back too
            await limit(http("/fail"), receiving(), Sent())
        assert limit.active == 0
        one = Sent()
        await limit(http("/healthz"), receiving(), one)
        assert one.status() == 200

    asyncio.run(run())


def test_one_place_left_is_a_place() -> None:
    async def run() -> None:
        release = asyncio.Event()

        async def app(scope: dict, receive: Any, send: Any) -> None:
            await release.wait()

        limit = ConnectionLimit(app, 2)
        first = asyncio.create_task(limit(http("/v1/models"), receiving(), Sent()))
        await asyncio.sleep(0)
        second = asyncio.create_task(limit(http("/v1/models"), receiving(), sent := Sent()))
        await asyncio.sleep(0)
        assert limit.active == 2 and sent == []
        release.set()
        await asyncio.gather(first, second)

    asyncio.run(run())


# ----- SessionGate ---------------------------------------------------------------------------------
def gated(fe: Frontend) -> tuple[SessionGate, list[dict]]:
    seen: list[dict] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append({"path": scope["path"], "admitting": dict(fe.admitting), "marked": ADMITTED in scope})

    return SessionGate(app), seen


def steps_scope(fe: Frontend, owner: str, path: str = "/v1/sessions/s1/steps", **extra: Any) -> dict[str, Any]:
    app = SimpleNamespace(state=SimpleNamespace(frontend=fe, metrics=FrontendMetrics()))
    return http(path, "POST", app=app, **{OWNER: owner}, **extra)


def test_the_session_gate_refuses_the_owners_full_session_only() -> None:
    async def run() -> None:
        fe, _ = frontend(session_queue=1)
        gate, seen = gated(fe)
        fe.outstanding[("a", "s1")] = 1
        refused = Sent()
        await gate(steps_scope(fe, "a"), receiving(), refused)
        assert refused.status() == 429 and refused.json()["error"]["code"] == "session_queue_full"
        await gate(steps_scope(fe, "b"), receiving(), Sent())  # another key's session of that id: the app's
        await gate(steps_scope(fe, "a", "/v1/sessions/s1/other"), receiving(), Sent())  # not a steps route
        assert [s["path"] for s in seen] == ["/v1/sessions/s1/steps", "/v1/sessions/s1/other"]

    asyncio.run(run())


def test_a_request_let_through_from_its_head_counts_as_any_once_it_reaches_the_gate() -> None:
    async def run() -> None:
        fe, _ = frontend(session_queue=2)
        gate, seen = gated(fe)
        assert fe.admit("s1", "a") is None
        await gate(steps_scope(fe, "a", **{ADMITTED: (fe, ("a", "s1"))}), receiving(), Sent())
        assert seen == [{"path": "/v1/sessions/s1/steps", "admitting": {}, "marked": False}]

    asyncio.run(run())


# ----- BodyLimit -----------------------------------------------------------------------------------
def body_app() -> tuple[Any, list[Any]]:
    """An app that reads the whole body, then one more message (what comes after it)."""
    got: list[Any] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            msg = await receive()
            body, more = body + msg.get("body", b""), msg.get("more_body", False)
        got.append(body)
        got.append((await receive())["type"])

    return app, got


def chunks(*parts: bytes) -> list[dict]:
    return [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]


def test_a_body_of_exactly_the_limit_is_read_whole_and_one_byte_more_is_413() -> None:
    async def run() -> None:
        app, got = body_app()
        limit = BodyLimit(app, 1024)
        for announced in (True, False):
            for size, status in ((1024, None), (1025, 413)):
                del got[:]
                parts = (b"x" * 1000, b"y" * (size - 1000))
                headers = [(b"content-length", str(size).encode())] if announced else []
                sent = Sent()
                disconnect = {"type": "http.disconnect"}
                await limit(http("/v1/classify", "POST", headers), receiving(*chunks(*parts), disconnect), sent)
                assert sent.status() == status, (announced, size)
                if status is None:  # the app got the body in one piece, then the real next message
                    assert got == [b"".join(parts), "http.disconnect"]
                else:
                    assert got == [] and sent.json()["error"]["code"] == "request_too_large"

    asyncio.run(run())


def test_a_client_that_leaves_before_its_body_ends_never_reaches_the_app() -> None:
    async def run() -> None:
        app, got = body_app()
        sent = Sent()
        msgs = [{"type": "http.request", "body": b"{\"st", "more_body": True}, {"type": "http.disconnect"}]
        await asyncio.wait_for(BodyLimit(app, 1024)(http("/v1/classify", "POST"), receiving(*msgs), sent), 1)
        assert got == [] and sent == []

    asyncio.run(run())


# ----- SlowReaders ---------------------------------------------------------------------------------
class Transport:
    """A connection's transport whose write buffer reports ``sizes`` in turn (one per look), then ``after``."""

    def __init__(self, sizes: Iterator[int], after: int = 0) -> None:
        self.sizes, self.after = sizes, after
        self.aborted = False

    def get_write_buffer_size(self) -> int:
        return next(self.sizes, self.after)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket: no kernel queue to add, no SO_LINGER to set

    def abort(self) -> None:
        self.aborted = True


class Connection:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    async def send(self, message: dict) -> None:
        pass


async def watch(sizes: Iterator[int], timeout_s: float, for_s: float, after: int = 0,
                request_runs: asyncio.Event | None = None) -> tuple[Transport, SlowReaders]:
    """One request on a connection whose buffer reports ``sizes``; after ``for_s``, the transport and the watcher."""
    async def app(scope: dict, receive: Any, send: Any) -> None:
        if request_runs is not None:
            await request_runs.wait()

    readers = SlowReaders(app, timeout_s)
    conn = Connection(Transport(sizes, after))
    request = asyncio.create_task(readers({"type": "http"}, None, conn.send))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + for_s
    while loop.time() < deadline and not conn.transport.aborted:
        await asyncio.sleep(0.02)
    if request_runs is not None:
        request_runs.set()
    await request
    return conn.transport, readers


def test_a_client_that_reads_nothing_is_dropped_after_the_timeout() -> None:
    async def run() -> tuple[Transport, float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        transport, _ = await watch(iter(()), timeout_s=0.2, for_s=1.5, after=1000)  # never shrinks
        return transport, loop.time() - t0

    transport, took = asyncio.run(run())
    assert transport.aborted and 0.2 < took < 1.5


def test_answers_queued_behind_unread_ones_do_not_restart_the_clock() -> None:
    async def run() -> Transport:
        transport, _ = await watch(itertools.count(1000, 100), timeout_s=0.2, for_s=1.5)  # grows at every look
        return transport

    assert asyncio.run(run()).aborted


def test_a_client_that_read_everything_starts_a_fresh_clock_for_its_next_answer() -> None:
    """Unsent bytes, then none while the request still runs (the client read them all), then unsent bytes
    again: each stretch is shorter than the timeout, so the client is not dropped."""
    async def run() -> Transport:
        sizes = iter([500, 500, 0, 0, 500, 500, 500])  # one per look, every 0.1 s; then 0
        transport, readers = await watch(sizes, timeout_s=0.4, for_s=0.8, request_runs=asyncio.Event())
        await asyncio.sleep(0.25)
        assert readers.watched == {}  # forgotten once empty with no request in flight
        return transport

    assert not asyncio.run(run()).aborted


def test_a_request_that_ends_before_the_session_gate_is_no_longer_counted_as_let_through() -> None:
    async def run() -> None:
        fe, _ = frontend(session_queue=1)
        assert fe.admit("s1", "a") is None

        async def app(scope: dict, receive: Any, send: Any) -> None:
            raise RuntimeError("refused or failed before SessionGate")

        conn = Connection(Transport(iter(())))
        with pytest.raises(RuntimeError):
            await SlowReaders(app, 1.0)({"type": "http", ADMITTED: (fe, ("a", "s1"))}, None, conn.send)
        assert fe.admitting == {} and fe.admit("s1", "a") is None

    asyncio.run(run())


# ----- auth.py -------------------------------------------------------------------------------------
def test_the_bearer_scheme_is_case_insensitive_and_spaces_around_the_key_are_not_part_of_it() -> None:
    for value, key in ((b"Bearer k-123", "k-123"), (b"bearer k-123", "k-123"), (b"BEARER k-123", "k-123"),
                       (b"Bearer   k-123  ", "k-123"), (b"Basic k-123", None), (b"k-123", None)):
        assert bearer_key(value) == key, value


def test_a_key_is_compared_with_every_configured_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [f"unit-key-{i}-0123456789abcdef" for i in range(3)]
    ring = KeyRing(Settings(api_keys=",".join(keys)).key_hashes)
    compared: list[bytes] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for key in (keys[0], keys[2], "not-a-key-0123456789abcdef"):
        compared.clear()
        ring.owner(key)
        assert compared == list(ring.hashes), key  # no early exit: the time does not say which one matched
    assert ring.owner(keys[0]) != ring.owner(keys[2]) and ring.owner("not-a-key-0123456789abcdef") is None


def access(origins: str) -> AccessControl:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        pass

    return AccessControl(app, Settings(allowed_origins=origins))


def test_the_origin_policy() -> None:
    listed = access("http://allowed.example")
    host = b"127.0.0.1:8000"
    for origin, h, allowed in ((b"http://allowed.example", None, True),
                               (b"HTTP://Allowed.Example/", None, True),  # origins are case-insensitive
                               (b"http://127.0.0.1:8000", host, True),  # the server's own
                               (b"http://127.0.0.1:8000", b"127.0.0.1:8000 ", True),
                               (b"http://127.0.0.1:8000", b"127.0.0.1:8001", False),
                               (b"127.0.0.1:8000", host, False),  # no scheme: not an origin
                               (b"http://127.0.0.1:8000", None, False),  # no Host to compare with
                               (b"null", b"", False),  # nor is "null", whatever the Host
                               (b"null", None, False), (b"http://evil.example", host, False)):
        assert listed.origin_allowed(origin, h) is allowed, (origin, h)
    anyone = access("*")
    assert anyone.origin_allowed(b"http://evil.example", None) and anyone.origin_allowed(b"null", host)


def test_an_origin_without_a_host_is_refused_not_an_error() -> None:
    async def run() -> Sent:
        sent = Sent()
        await access("http://allowed.example")(http("/v1/models", headers=[(b"origin", b"http://evil.example")]),
                                               receiving(), sent)
        return sent

    sent = asyncio.run(run())
    assert sent.status() == 403 and sent.json()["error"]["code"] == "origin_not_allowed"
