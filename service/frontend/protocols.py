"""uvicorn's HTTP and WebSocket protocols with what a public service needs on top, so that every refusal
made before the app runs is an answer in the API's error shape (``{"error": {...}}``, or the Open
Inference Protocol's ``{"error": "..."}`` under ``/v2``) and never a hang:

- a bound on each request's head (``PSN_MAX_HEADER_BYTES``, 431): httptools has none of its own;
- a request httptools cannot parse (a negative or doubled Content-Length, a bad chunk size, control
  bytes in a header) is a 400 ``bad_request`` in that shape, not uvicorn's plain-text line;
- a WebSocket handshake the websockets library cannot parse (a request line or a header line over its
  8,192 bytes, over 128 headers) is answered 414 / 431 / 400 in that shape: uvicorn before 0.55 left
  websockets' answer unsent and the connection open, so the client waited for ever; 0.55 sends
  websockets' plain-text answer; one that parses but that websockets refuses (no valid
  ``Sec-WebSocket-Key``, a version other than 13) is a 400 in that shape too;
- a handshake refused by the app with an HTTP answer (401, 403) is not logged as an app error;
- a request whose client half-closes the connection after sending it is still answered;
- a client must send each request whole (head and body) within ``PSN_READ_TIMEOUT_S`` of its first byte
  (its first request: of the connection's opening): one that trickles bytes, or connects and sends
  nothing, would hold its connection (and, with a body under way, a ``PSN_MAX_CONNECTIONS`` place) for
  ever. A request under way is answered 408 ``read_timeout``; a connection that sent nothing is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from service.errors import HeadersTooLarge, MethodNotAllowed, ReadTimeout, ServiceError, UpgradeRequired, UrlTooLong
from service.frontend.limits import error_answer, raw_answer
from service.logs import hide_keys

log = logging.getLogger("psn.frontend")


def write_error(transport: asyncio.Transport, err: ServiceError, path: bytes,
                count: Callable[[str], None] | None = None) -> None:
    """Answer ``err`` in the shape for ``path`` straight onto the connection, then close it; ``count``: told the
    error's code (``psn_errors_total``, as for the app's own refusals)."""
    if count is not None:
        count(err.code)
    headers, data = error_answer(err, path, ((b"connection", b"close"),))
    transport.write(raw_answer(err.status, headers, data))
    transport.close()


# (method, url, the request's ASGI scope so far, uvicorn's default headers) -> a whole answer, or None (gate.py)
Refusal = Callable[[bytes, bytes, dict[str, Any], list[tuple[bytes, bytes]]], bytes | None]


def http_protocol(max_bytes: int, refusal: Refusal | None = None, read_timeout_s: float | None = None,
                  count: Callable[[str], None] | None = None) -> type[asyncio.Protocol] | None:
    """uvicorn's httptools protocol with a bound on each request's head (request line and headers, the
    WebSocket handshake's too): past ``max_bytes`` it answers 431 ``headers_too_large`` and closes the
    connection (httptools would read a 100 MB header into memory); a request it cannot parse is a 400
    ``bad_request``. None without httptools (uvicorn then runs h11, bounded by
    ``h11_max_incomplete_event_size``: a 400).

    ``refusal`` (``gate.FastRefusal.answer``) may answer a request from its head, with no ASGI cycle (the
    connection is kept alive; the request's body is read and dropped as it comes). It is
    asked only when nothing else of the connection is being answered (answers keep their order), the
    client reads its answers (uvicorn's write buffer is below its high-water mark) and the request is
    plain HTTP/1.1 keep-alive without ``Expect: 100-continue``.

    ``read_timeout_s``: each request must have come in whole (head and body) that long after its first byte,
    or after the connection opened for its first one (None: no bound, uvicorn's way).

    ``count`` is told the code of each refusal made here (``FrontendMetrics.error``)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        from uvicorn.protocols.utils import get_client_addr
    except ImportError:
        return None

    class HttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.head_size = 0  # of the current request's head, as parsed (url and headers)
            self.head_raw = 0  # bytes read while the current request's head was incomplete
            self.in_head = False  # between a request's first byte and the end of its headers
            self.ended = False  # a request ended in the bytes being read (they are not all head)
            self.too_large = False
            self.head_path = b""  # the current request's path, as far as it came (its error's shape)
            self.refused = False  # the request being read was answered from its head (``refusal``)
            self.read_timer: asyncio.TimerHandle | None = None  # armed while a request is awaited or read

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.arm_read_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm_read_timer()
            super().connection_lost(exc)

        def arm_read_timer(self) -> None:
            if read_timeout_s is not None and self.read_timer is None:
                self.read_timer = self.loop.call_later(read_timeout_s, self.read_timed_out)

        def disarm_read_timer(self) -> None:
            if self.read_timer is not None:
                self.read_timer.cancel()
                self.read_timer = None

        def read_timed_out(self) -> None:
            """The request being read (or the first one awaited) has taken ``read_timeout_s``. A request whose
            head or body is late is answered 408 and the connection closed; a connection that sent nothing is
            closed; a late pipelined head behind an answer still due closes the connection after that answer."""
            self.read_timer = None
            if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed, or upgraded
                return
            cycle = self.cycle
            answering = cycle is not None and not cycle.response_complete  # a request of this connection runs
            if answering and not self.in_head and cycle.more_body:  # its body is late
                cycle.keep_alive, cycle.disconnected = False, True  # the app's receive() gets a disconnect:
                cycle.message_event.set()  # it never takes a half body for a whole one
                if cycle.response_started:
                    self.transport.close()
                    return
            elif self.in_head and answering:  # a pipelined request: the answer before it goes out first
                cycle.keep_alive = False
                return
            elif not self.in_head:  # nothing sent since the connection opened
                self.transport.close()
                return
            log.info("a request did not come in whole within %g s (PSN_READ_TIMEOUT_S): 408, closing",
                     read_timeout_s)
            write_error(self.transport, ReadTimeout(
                f"request: not sent in full within {read_timeout_s:g} s of its first byte (PSN_READ_TIMEOUT_S); "
                "send the request line, headers and body without pauses", field="request"), self.head_path, count)

        def data_received(self, data: bytes) -> None:
            self.ended = False
            super().data_received(data)
            if self.in_head and not self.ended and not self.too_large and not self.transport.is_closing():
                self.head_raw += len(data)  # a head that does not end (one endless header) is stopped here
                if self.head_raw > max_bytes:
                    self.too_large = True
                    self.send_400_response("")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.arm_read_timer()  # already armed for a connection's first request (from its opening)
            self.in_head, self.head_size, self.head_raw, self.head_path = True, 0, 0, b""

        def on_url(self, url: bytes) -> None:
            self.head_size += len(url)
            if len(self.head_path) < 3:
                self.head_path += url[:3]
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self.head_size += len(name) + len(value) + 4
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self.in_head = False
            if self.head_size > max_bytes:  # a whole head that came in one read
                self.too_large = True
                raise HeadersTooLarge("")  # httptools stops parsing; uvicorn then calls send_400_response
            if refusal is not None and self.answerable():
                method = self.parser.get_method()
                answer = refusal(method, self.url, self.scope, self.server_state.default_headers)
                if answer is not None:
                    if self.access_log:
                        self.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(self.scope),
                                                method.decode("ascii", "replace"),
                                                self.url.decode("ascii", "replace"), "1.1", int(answer[9:12]))
                    self.refused = True
                    self.transport.write(answer)  # from the head, as the app would: a body may never come
                    self.on_response_complete()  # counts the request, arms the keep-alive timer
                    return
            super().on_headers_complete()

        def answerable(self) -> bool:
            return ((self.cycle is None or self.cycle.response_complete) and not self.pipeline
                    and not self.flow.write_paused and not self.expect_100_continue
                    and self.parser.get_http_version() == "1.1" and self.parser.should_keep_alive()
                    and not self.parser.should_upgrade())

        def on_body(self, body: bytes) -> None:
            if not self.refused:  # a refused request's body is read and dropped
                super().on_body(body)

        def on_message_complete(self) -> None:
            self.ended = True
            self.disarm_read_timer()
            if not self.refused:
                super().on_message_complete()
            self.refused = False

        def eof_received(self) -> bool | None:
            """The client shut down its sending side (a half-close, as ``shutdown(SHUT_WR)``, ``nc -N`` or
            ``curl`` with a closed stdin do) after a whole request: that request is still answered, and the
            connection closed after it. uvicorn's ``eof_received`` returns None, so asyncio closed the
            connection at once: the request ran (steps applied, a session opened) and its answer was lost."""
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete and not cycle.more_body:
                cycle.keep_alive = False  # the last request the client sent: close once it is answered
                return True
            return None  # nothing left to answer, or a body that will never end: close as before

        def handle_websocket_upgrade(self) -> None:
            self.disarm_read_timer()  # the handshake's head has come; the WebSocket protocol takes over
            super().handle_websocket_upgrade()

        def send_400_response(self, msg: str) -> None:
            if self.too_large:
                err: ServiceError = HeadersTooLarge(f"headers: the request line and headers exceed {max_bytes} "
                                                    "bytes (PSN_MAX_HEADER_BYTES)", field="headers")
            else:  # uvicorn has logged it (a warning)
                err = ServiceError("request: not a valid HTTP/1.1 request (its request line, a header or the body's "
                                   "framing: Content-Length, Transfer-Encoding, chunk sizes)", field="request")
            write_error(self.transport, err, self.head_path, count)

    return HttpProtocol


def ws_protocol(count: Callable[[str], None] | None = None,
                read_timeout_s: float | None = None) -> type[asyncio.Protocol] | str:
    """uvicorn's WebSocket protocol on the websockets library (what ``"auto"`` picks), answering handshakes
    it cannot parse (``count`` is told each refusal's code) and not logging the app's HTTP refusals as errors;
    ``"auto"`` where it is missing.

    ``read_timeout_s``: a message must come in whole that long after its first byte, as an HTTP request
    must. Without it a client could send most of a message (up to the frame limit, 4 MB or more) and stall:
    each connection up to PSN_MAX_CONNECTIONS then holds that much of the front end's memory for as long as
    it likes. Past it the connection is closed with 1008 (policy) and a reason naming the setting; an open
    connection between messages is not bound by it."""
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    except ImportError:
        return "auto"
    from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS

    def handshake_error(exc: BaseException) -> ServiceError:
        name = type(exc).__name__  # websockets.exceptions' names (older versions lack some)
        if name == "RequestLineTooLong":
            return UrlTooLong(f"url: a WebSocket handshake's request line has at most {MAX_LINE_LENGTH} bytes",
                              field="url")
        if name == "HeaderLineTooLong":
            return HeadersTooLarge(f"headers: a WebSocket handshake's header lines have at most {MAX_LINE_LENGTH} "
                                   "bytes each", field="headers")
        if name == "TooManyHeaders":
            return HeadersTooLarge(f"headers: a WebSocket handshake has at most {MAX_NUM_HEADERS} headers",
                                   field="headers")
        if name == "InvalidMethod":
            return MethodNotAllowed(f"method: a WebSocket handshake is a GET request ({exc})", field="method",
                                    allow="GET")
        if name == "InvalidUpgrade":
            return UpgradeRequired(f"Upgrade: a WebSocket handshake asks for Upgrade: websocket ({exc})",
                                   field="Upgrade")
        cause = hide_keys(str(exc.__cause__ or exc))  # a bad Sec-WebSocket-Protocol header is quoted, keys and all
        return ServiceError(f"request: not a valid WebSocket handshake ({cause})", field="request")

    class WsProtocol(WebSocketsSansIOProtocol):
        partial_timer: asyncio.TimerHandle | None = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            exc = getattr(self.conn, "handshake_exc", None)
            if not self.handshake_initiated and exc is not None and not self.transport.is_closing():
                self.refuse_handshake(exc)  # uvicorn < 0.55 left websockets' answer unsent
            if read_timeout_s is not None:
                self.watch_partial()

        async def receive(self) -> Any:
            message = await super().receive()
            if read_timeout_s is not None:
                self.watch_partial()  # reading resumed (the app took the message queued): the clock runs again
            return message

        def watch_partial(self) -> None:
            """Time the message under way from its first byte: a frame begun (bytes websockets holds unparsed)
            or a message of several frames begun. Not while reading is paused: uvicorn pauses it as it hands
            each whole message to the app, until the app takes it, and the rest of the next one may be sent
            and waiting unread meanwhile, so its clock starts again, whole, when reading resumes. (So a message
            read whole ends the clock of its own: the steady-stream test holds uvicorn to that.)"""
            partial = (bool(self.conn.reader.buffer) or bool(self.frames)) and not self.read_paused
            if not partial:
                self.stop_partial_clock()
            elif self.partial_timer is None and not self.transport.is_closing():
                self.partial_timer = self.loop.call_later(read_timeout_s, self.partial_timed_out)

        def stop_partial_clock(self) -> None:
            if self.partial_timer is not None:
                self.partial_timer.cancel()
                self.partial_timer = None

        def partial_timed_out(self) -> None:
            self.partial_timer = None
            if self.transport.is_closing():
                return
            if self.close_sent:  # the app closed first, and the client stalls mid-message instead of answering:
                self.transport.close()  # a second close frame would be a protocol error (InvalidState)
                return
            log.info("websocket closed: a message not sent in full within %g s of its first byte", read_timeout_s)
            if count is not None:
                count("read_timeout")
            self.conn.send_close(1008, f"read_timeout: a message must come in whole within {read_timeout_s:g} s "
                                       "of its first byte (PSN_READ_TIMEOUT_S)")
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self.stop_partial_clock()
            super().connection_lost(exc)

        def handle_connect(self, event: Any) -> None:
            """A handshake that parses but that websockets refuses (no or a bad ``Sec-WebSocket-Key``, a version other
            than 13, a header given twice) is a 400: uvicorn writes websockets' plain-text one, ours is in the API's
            shape. (``accept`` runs again in uvicorn's ``handle_connect``; it only reads the request.)"""
            if self.conn.accept(event).status_code in (400, 405, 426):  # 405: not GET, 426: not Upgrade: websocket
                self.handshake_initiated = self.handshake_complete = True
                self.refuse_handshake(self.conn.handshake_exc)
                return
            super().handle_connect(event)

        def handle_handshake_exception(self) -> None:
            """uvicorn >= 0.55 writes websockets' own plain-text answer here: ours is in the API's shape."""
            self.handshake_complete = True
            self.refuse_handshake(self.conn.handshake_exc)

        def refuse_handshake(self, exc: BaseException) -> None:
            self.conn.data_to_send()  # websockets' own plain-text answer: not sent
            log.info("websocket handshake refused: %s", hide_keys(str(exc)))
            write_error(self.transport, handshake_error(exc), b"/v1", count)
            self.close_sent = True

        async def send(self, message: Any) -> None:
            await super().send(message)
            if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
                self.handshake_complete = True  # answered (a refusal): uvicorn would log "returned without
                # completing handshake" as an app error for every refused client

    return WsProtocol


class InvalidUtf8(logging.Filter):
    """uvicorn logs a text frame that is not UTF-8 as an error with a traceback; it is the client's fault,
    answered with close 1007 as RFC 6455 says: one line at INFO (any client could fill the log)."""

    MESSAGE = "Invalid UTF-8 sequence received from client."

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.MESSAGE:
            return True
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)
