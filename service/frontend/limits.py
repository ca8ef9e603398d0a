"""ASGI middleware: refuse HTTP bodies larger than ``max_bytes`` with 413 before the app reads them, hold
each front-end process to ``PSN_MAX_CONNECTIONS`` WebSockets plus HTTP requests in flight, and drop HTTP
clients that do not read their responses (``SlowReaders``; WebSockets: ``routes/stream.py``). The bound
on request heads is in uvicorn's protocol (``protocols.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import socket
import struct
import termios
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.utils import ClientDisconnected

from service.errors import RequestTooLarge, ServiceError, TooManyConnections

log = logging.getLogger("psn.frontend")

# probes answer even when the limit is reached
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
OWNER = "psn.owner"  # scope key: the owner id of the request's API key ("" with access control off; auth.py)
ABORT = "psn.abort"  # scope key of a WebSocket: drops the connection at once (or None where that is not possible)
ADMITTED = "psn.admitted"  # scope key: (Frontend, key) of a steps request let through from its head (gate.py)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body``, read already, as one message, then what ``receive`` gives."""
    replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay_receive() -> Message:
        return replay.pop() if replay else await receive()

    return replay_receive


def release_admitted(scope: Scope) -> None:
    """The request has reached ``SessionGate`` or ended: it no longer counts as let through from its head."""
    held = scope.pop(ADMITTED, None)
    if held is not None:
        held[0].admitted(held[1])


def count_error(scope: Scope, err: ServiceError) -> None:
    metrics = getattr(scope["app"].state, "metrics", None) if "app" in scope else None
    if metrics is not None:
        metrics.error(err.code)


def error_answer(err: ServiceError, path: str | bytes,
                 extra: tuple[tuple[bytes, bytes], ...] = ()) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers (content type and length, ``extra``, the error's own) and the JSON body answering ``err``
    to a request for ``path``, for the answers written outside FastAPI's handlers."""
    data = json.dumps(err.body_for(path)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data)), *extra,
               *((k.lower().encode(), v.encode()) for k, v in err.headers().items())]
    return headers, data


def raw_answer(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A whole HTTP/1.1 answer, to write straight onto a connection (no ASGI)."""
    head = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
    head.extend(b"%s: %s\r\n" % (name, value) for name, value in headers)
    return b"".join([*head, b"\r\n", body])


async def send_json_error(scope: Scope, send: Send, err: ServiceError, extra: list[tuple[bytes, bytes]]) -> None:
    count_error(scope, err)
    headers, data = error_answer(err, scope["path"], tuple(extra))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def transport_abort(send: Send) -> Callable[[], None] | None:
    """uvicorn's way to drop a connection at once. ASGI has none: a close waits until the buffered output is
    sent, which for a client that stopped reading is never. ``send`` here is the server's own (bound) method."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if not callable(getattr(transport, "abort", None)):
        return None
    return lambda: reset(transport)


def unsent_in_kernel(transport: Any) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the client (Linux SIOCOUTQ; else 0)."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(termios, "TIOCOUTQ"):
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0


def reset(transport: Any) -> None:
    """Drop a connection whose client stopped reading, with a TCP reset (SO_LINGER 0): a plain abort closes
    with a FIN queued behind the unsent bytes, and the kernel then keeps them (megabytes per connection) in
    an orphaned socket that probes the client's zero window for minutes."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class ConnectionLimit:
    """At most ``max_connections`` WebSockets plus HTTP requests in flight; past it a WebSocket is accepted,
    told why (an ``error`` message) and closed with 1013 (try again later), and HTTP gets 503."""

    def __init__(self, app: ASGIApp, max_connections: int):
        self.app, self.max_connections = app, max_connections
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in UNLIMITED_PATHS:
            return await self.app(scope, receive, send)
        if self.active >= self.max_connections:
            err = TooManyConnections(f"this front end already serves {self.active} connections and requests "
                                     f"(PSN_MAX_CONNECTIONS={self.max_connections}); retry shortly", retry_after=1)
            if scope["type"] == "http":
                return await send_json_error(scope, send, err, [])
            count_error(scope, err)
            if (await receive())["type"] != "websocket.connect":
                return
            with contextlib.suppress(ClientDisconnected, OSError):  # a client that has already gone
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.send", "text": json.dumps({"type": "error", "error": err.ws_error(),
                                                                          "id": None})})
                await send({"type": "websocket.close", "code": 1013, "reason": "too many connections"})
            return
        self.active += 1
        if scope["type"] == "websocket":
            scope[ABORT] = transport_abort(send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


STEPS_PREFIX, STEPS_SUFFIX = "/v1/sessions/", "/steps"


def steps_session(path: str) -> str | None:
    """The session id of a ``/v1/sessions/{id}/steps`` path (the route's), else None."""
    if not (path.startswith(STEPS_PREFIX) and path.endswith(STEPS_SUFFIX)):
        return None
    sid = path[len(STEPS_PREFIX):-len(STEPS_SUFFIX)]
    return sid if sid and "/" not in sid else None


class SessionGate:
    """``POST /v1/sessions/{id}/steps`` past the session's queue bound (``Frontend.queue_full``) is answered
    429 ``session_queue_full`` here, before the body is read or parsed and without asking the engine core.
    Sits inside ``AccessControl`` (which sets the request's owner) and outside ``BodyLimit`` (which reads
    the body). Most such refusals never get here: uvicorn's protocol gives the same answer from the
    request head (gate.py); this one answers what that leaves to the app (an ``Origin``, pipelining)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            release_admitted(scope)  # from here on it counts (or is refused) as any request does
            sid = steps_session(scope["path"])
            fe = getattr(scope["app"].state, "frontend", None) if sid is not None else None
            if fe is not None:
                err = fe.queue_full(sid, scope.get(OWNER, ""))
                if err is not None:
                    return await send_json_error(scope, send, err, [])
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, send, int(length))
        body, more = [], True
        size = 0
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(scope, send, size)
            body.append(chunk)
            more = msg.get("more_body", False)
        await self.app(scope, replaying(b"".join(body), receive), send)

    async def _refuse(self, scope: Scope, send: Send, size: int) -> None:
        err = RequestTooLarge(f"body: {size} bytes, at most {self.max_bytes} allowed (PSN_MAX_REQUEST_BYTES)",
                              field="body")
        await send_json_error(scope, send, err, [(b"connection", b"close")])


class SlowReaders:
    """Resets an HTTP connection whose unsent response bytes have not moved for ``timeout_s``
    (``PSN_WS_SEND_TIMEOUT_S``, the WebSocket bound): a client that sends requests, pipelined, and never
    reads the answers. uvicorn has no write timeout, so such a connection kept its answers in memory for
    ever (about 2 MB of the front end's heap and 3.7 MB of kernel buffers for five 1024-step answers of
    the shipped mnist1d model): while an answer waited for room its request held a ``PSN_MAX_CONNECTIONS``
    slot, and once the last answer was written, the keep-alive close waited for a flush that never came.

    It wraps the whole app (``worker.py``): it needs uvicorn's own ``send``, whose ``__self__`` holds the
    connection's transport (Starlette's error middleware wraps ``send`` for HTTP). Per request it only
    notes the transport; one task per front end looks at the watched transports' buffers a few times a
    second and forgets those that are empty with no request in flight (their next request notes them
    again; one in flight may still write a large answer: forgotten while the engine core computed it,
    a connection that never read was kept for ever). A slow reader is
    not a stuck one: what counts is the bytes waiting in the transport plus those in the kernel's send
    queue not yet acknowledged, which shrink whenever the client reads."""

    def __init__(self, app: ASGIApp, timeout_s: float):
        self.app, self.timeout_s = app, timeout_s
        # transport -> [bytes buffered when last seen, since when, requests in flight]
        self.watched: dict[Any, list] = {}
        self.task: asyncio.Task | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            seen = None
            if transport is not None and hasattr(transport, "get_write_buffer_size"):
                seen = self.watched.get(transport)
                if seen is None:
                    seen = self.watched[transport] = [None, 0.0, 0]
                    if self.task is None or self.task.done():
                        self.task = asyncio.get_running_loop().create_task(self.run(), name="http-slow-readers")
                seen[2] += 1  # requests of this connection in flight: it is watched until they are done
            try:
                return await self.app(scope, receive, send)
            finally:
                if seen is not None:
                    seen[2] -= 1
                release_admitted(scope)  # refused before SessionGate (ConnectionLimit), or failed
        await self.app(scope, receive, send)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.watched:
            await asyncio.sleep(min(0.25, self.timeout_s / 4))
            now = loop.time()
            for transport, seen in list(self.watched.items()):
                try:
                    size = transport.get_write_buffer_size()
                except Exception:  # noqa: BLE001 - a transport that has gone
                    size = 0
                if size == 0:
                    if seen[2] <= 0:  # nothing unsent and no request in flight (its answer may come later)
                        del self.watched[transport]
                    else:
                        seen[0] = None
                    continue
                size += unsent_in_kernel(transport)  # a slow reader moves these first
                if seen[0] is None or size < seen[0]:  # first look, or the client read some
                    seen[0], seen[1] = size, now
                elif now - seen[1] > self.timeout_s:
                    del self.watched[transport]
                    log.info("http client not reading (%d response bytes unsent for %.3g s): dropped", size,
                             now - seen[1])
                    reset(transport)
                else:
                    seen[0] = size  # more answers queued behind the unread ones: the clock keeps running
