"""WS /v1/stream: open or attach to a session, then stream steps; answers come back in order.

Client messages (JSON text): ``{"type": "open", "model", "frames"?}``, ``{"type": "attach",
"session_id", "frames"?}``, ``{"type": "steps", "steps", "start"?, "id"?}``, ``{"type": "close"}``.
Server messages: ``opened`` / ``attached`` (with ``session``), ``steps`` (``outputs``), ``closed``,
``expired`` (pushed when the idle timeout closes the session), ``error`` (``error.code``,
``error.message``, ``error.field``, and ``error.retry_after`` where waiting helps); after an error the
connection stays usable. A message over ``PSN_MAX_REQUEST_BYTES`` is refused before it is parsed.

A send that has waited ``PSN_WS_SEND_TIMEOUT_S`` for room in the connection's output buffer drops the
client (it stopped reading): ``SendWatchdog`` aborts the connection (a polite close would wait for the
same full buffer).

Binary frames (``service/frontend/codec.py``, docs/api.md): chosen with the ``psn.binary.v1``
subprotocol or ``"frames": "binary"`` on open/attach; then steps go as binary frames and are answered
with binary frames, while open/attach/close and every error stay JSON text.

With API keys, the handshake carries one (``service/frontend/auth.py``: a header, or a ``psn.key.<key>``
subprotocol entry from a browser, which the server never selects); the connection acts for that key.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import Field, TypeAdapter, ValidationError
from pydantic_core import from_json
from uvicorn.protocols.utils import ClientDisconnected

from service.errors import InvalidInput, RequestTooLarge, ServiceError, UpgradeRequired, internal
from service.frontend.auth import JSON_SUBPROTOCOL, OWNER, refuse
from service.frontend.codec import REQUEST_HEADER, ModelCodec, join_object, may_hold_booleans
from service.frontend.deps import get_frontend
from service.frontend.limits import ABORT
from service.frontend.state import Frontend
from service.schemas import WsAttach, WsClose, WsOpen, WsSteps, plain_json, unknown_field

router = APIRouter(tags=["stream"])
log = logging.getLogger("psn.stream")

MESSAGES = {"open": WsOpen, "attach": WsAttach, "steps": WsSteps, "close": WsClose}  # by "type"
ClientMessage = TypeAdapter(Annotated[WsOpen | WsAttach | WsSteps | WsClose, Field(discriminator="type")])
BINARY_SUBPROTOCOL = "psn.binary.v1"


class SendWatchdog:
    """Drops connections whose current send has waited longer than ``timeout_s``. One task per front end
    looks a few times a second while there are connections, so a send costs two attribute writes (a timer
    per send, ``asyncio.timeout`` under uvloop, measured 7 us per send on the 2-core CPU)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.conns: set[StreamConnection] = set()
        self.task: asyncio.Task | None = None

    def add(self, conn: StreamConnection) -> None:
        self.conns.add(conn)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self.run(), name="ws-send-watchdog")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.conns:
            await asyncio.sleep(min(0.25, self.timeout_s / 4))
            now = loop.time()
            for conn in list(self.conns):
                if conn.sending_since is not None and now - conn.sending_since > self.timeout_s:
                    self.conns.discard(conn)
                    conn.drop(now - conn.sending_since)


class StreamConnection:
    """One WebSocket: at most one current session; sends are serialised (expiry pushes interleave)."""

    def __init__(self, ws: WebSocket, fe: Frontend, binary: bool):
        self.ws, self.fe, self.binary = ws, fe, binary
        self.owner: str = ws.scope.get(OWNER, "")  # the handshake's API key's owner id
        self.session: str | None = None
        self.codec: ModelCodec | None = None
        self.send_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()
        self.time = asyncio.get_running_loop().time
        self.sending_since: float | None = None  # while a send waits (SendWatchdog)
        # /v1/stream?session_id=ID: the id a proxy routes the connection by (docs/cluster.md); attach must name it
        self.routed_to: str | None = ws.query_params.get("session_id") or None

    async def send_raw(self, data: str | bytes) -> None:
        """Send one message (text or binary); it may wait for room in the output buffer (SendWatchdog)."""
        async with self.send_lock:
            self.sending_since = self.time()
            try:
                if isinstance(data, str):
                    await self.ws.send_text(data)
                else:
                    await self.ws.send_bytes(data)
            finally:
                self.sending_since = None

    def drop(self, waited: float) -> None:
        """The client has not read for ``waited`` s: abort the connection (its pending send then fails)."""
        abort = self.ws.scope.get(ABORT)
        log.info("websocket client not reading (a send waited %.3g s): %s", waited,
                 "dropped" if abort is not None else "cannot drop it (no transport to abort)")
        if abort is not None:
            abort()

    async def send(self, msg: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(msg))

    async def send_error(self, err: ServiceError, msg_id: Any = None) -> None:
        self.fe.metrics.error(err.code)
        await self.send({"type": "error", "error": err.ws_error(), "id": msg_id})

    def _on_event(self, kind: str, sid: str) -> None:  # pushed by the engine core
        if kind == "expired":  # self.session stays: the next message about it is answered 410
            task = asyncio.get_running_loop().create_task(self._push_expired(sid))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _push_expired(self, sid: str) -> None:
        try:
            await self.send({"type": "expired", "session_id": sid, "error": {
                "code": "session_expired", "message": f"session {sid!r} expired after "
                f"{self.fe.settings.idle_timeout_s:g} s without requests", "field": "session_id"}})
        except Exception:  # the client has gone
            pass

    def _bind(self, info: dict[str, Any], frames: str | None) -> None:
        self.unbind()
        self.session = info["session_id"]
        self.codec = self.fe.codec(info["model"])
        self.fe.remember(info, self.owner)
        self.fe.watch(self.session, self.owner, self._on_event)
        if frames is not None:
            self.binary = frames == "binary"

    def unbind(self) -> None:
        if self.session is not None:
            self.fe.unwatch(self.session, self._on_event)
        self.session = self.codec = None

    def _current(self) -> tuple[str, ModelCodec]:
        if self.session is None or self.codec is None:
            raise InvalidInput("no session on this connection: send {\"type\": \"open\", \"model\": ...} or "
                               "{\"type\": \"attach\", \"session_id\": ...} first", field="type")
        return self.session, self.codec

    async def handle_text(self, text: str) -> None:
        try:
            msg = ClientMessage.validate_json(text)
        except ValidationError as e:
            first = e.errors()[0]
            loc = first.get("loc", ())
            field = ".".join(str(p) for p in loc[1:]) or "message"
            if first.get("type") == "extra_forbidden":
                raise InvalidInput(unknown_field(field, MESSAGES.get(loc[0]) if len(loc) == 2 else None),
                                   field=field) from None
            raise InvalidInput(f"{field}: {first.get('msg', 'invalid message')}", field=field) from None
        fe = self.fe
        if isinstance(msg, WsSteps):
            sid, codec = self._current()
            if self.binary:
                raise InvalidInput("type: a JSON steps message, but this connection uses binary frames "
                                   "(psn.binary.v1): send steps as a binary frame, or reopen/attach with "
                                   "\"frames\": \"json\"", field="type")
            L, payload = codec.json_steps(msg.steps, fe.settings.max_steps_per_request,
                                          maybe_bools=may_hold_booleans(text))
            start, replayed, _, spikes, scores = await fe.steps(sid, codec, msg.start, L, payload, self.owner)
            await self.send_raw(join_object({"type": "steps", "session_id": sid, "id": msg.id, "start": start,
                                             "replayed": replayed}, codec.json_outputs(start, L, spikes, scores)))
        elif isinstance(msg, WsOpen):
            fe.codec(msg.model)
            info = await fe.client.call("open", msg.model, True, None, self.owner)
            self._bind(info, msg.frames)
            await self.send({"type": "opened", "session": info})
        elif isinstance(msg, WsAttach):
            if self.routed_to is not None and msg.session_id != self.routed_to:
                raise InvalidInput(f"session_id: this connection was opened for session {self.routed_to!r} "
                                   f"(/v1/stream?session_id=...), which is how a proxy routes it; attach to "
                                   f"{msg.session_id!r} on a connection opened for that one", field="session_id")
            fe.check_ready()
            info = await fe.client.call("get", msg.session_id, True, self.owner)
            self._bind(info, msg.frames)
            await self.send({"type": "attached", "session": info})
        else:
            sid, _ = self._current()
            fe.check_ready()
            try:
                await fe.client.call("close", sid, self.owner)
            except ServiceError as e:  # a refusal to wait on (429, 503) keeps the session: the client retries the close
                if e.status in (404, 410):  # the session is gone (or another key's): nothing left to close
                    self.unbind()
                raise
            self.unbind()
            await self.send({"type": "closed", "session_id": sid})

    async def handle_binary(self, data: bytes) -> None:
        sid, codec = self._current()
        if not self.binary:
            raise InvalidInput("frame: this connection uses JSON frames; choose binary frames with the "
                               f"{BINARY_SUBPROTOCOL} subprotocol or \"frames\": \"binary\" on open/attach",
                               field="frame")
        fe = self.fe
        msg_id, start, L, payload = codec.binary_steps(data, fe.settings.max_steps_per_request)
        start, replayed, _, spikes, scores = await fe.steps(sid, codec, start, L, payload, self.owner)
        await self.send_raw(codec.binary_answer(msg_id, start, replayed, L, spikes, scores))


@router.get("/v1/stream", include_in_schema=False)
async def stream_over_http() -> None:
    """A plain HTTP request here (curl, a browser's address bar) is told what the path is, not 404."""
    raise UpgradeRequired("Upgrade: /v1/stream is a WebSocket endpoint; open it with a WebSocket client "
                          "(ws://HOST:PORT/v1/stream, docs/api.md), not plain HTTP", field="Upgrade")


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    offered = ws.scope.get("subprotocols", ())
    binary = BINARY_SUBPROTOCOL in offered
    # Never a psn.key.<key> entry: a browser that offers one must offer a real one too, and gets that back.
    chosen = BINARY_SUBPROTOCOL if binary else JSON_SUBPROTOCOL if JSON_SUBPROTOCOL in offered else None
    if len(ws.query_params.getlist("session_id")) > 1:  # proxies route by the first, the connection would be pinned
        # to another: the session would run on a replica its other requests are not routed to
        return await refuse(ws.scope, ws.receive, ws.send, ServiceError(
            "session_id: the URL names more than one session_id; name the session once", field="session_id"))
    await ws.accept(subprotocol=chosen, headers=[(b"x-psn-worker", str(ws.app.state.worker).encode())])
    try:
        fe = get_frontend(ws)
    except ServiceError as e:
        await ws.send_text(json.dumps({"type": "error", "error": e.ws_error()}))
        await ws.close(code=1013)
        return
    conn = StreamConnection(ws, fe, binary)
    watchdog: SendWatchdog | None = getattr(ws.app.state, "send_watchdog", None)
    if watchdog is None:
        watchdog = ws.app.state.send_watchdog = SendWatchdog(fe.settings.ws_send_timeout_s)
    watchdog.add(conn)
    fe.metrics.connections.inc()
    limit = fe.settings.max_request_bytes
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            text, data = msg.get("text"), msg.get("bytes")
            try:
                size = len(text if text is not None else data or b"")
                if size > limit:  # before anything reads it (text: characters, at least as many as bytes / 4)
                    raise RequestTooLarge(f"message: {size} {'characters' if text is not None else 'bytes'}, at "
                                          f"most {limit} bytes allowed (PSN_MAX_REQUEST_BYTES)", field="message")
                if text is not None:
                    await conn.handle_text(text)
                elif data is not None:
                    await conn.handle_binary(data)
            except ServiceError as e:
                await conn.send_error(e, _msg_id(text, data, limit))
            except (WebSocketDisconnect, ClientDisconnected):
                raise
            except Exception as e:  # a bug, not bad input: say so and keep the connection
                log.exception("unexpected error on /v1/stream")
                await conn.send_error(internal(e), _msg_id(text, data, limit))
    except (WebSocketDisconnect, ClientDisconnected):
        pass
    except RuntimeError as e:  # starlette: sending on a socket the client has already closed
        log.debug("websocket gone: %s", e)
    finally:
        watchdog.conns.discard(conn)
        fe.metrics.connections.dec()
        conn.unbind()


def _msg_id(text: str | None, data: bytes | None, limit: int) -> Any:
    if data is not None:
        return REQUEST_HEADER.unpack_from(data)[0] if len(data) >= REQUEST_HEADER.size else None
    if text is None or len(text) > limit:  # an oversized message is never parsed, not even for its id
        return None
    try:  # the parser that read the message (pydantic's): an id in text it refused, e.g. "\ud800" (a lone
        # surrogate, which json.loads takes and strict parsers refuse), is not echoed, nor one of NaN or Infinity
        d = from_json(text or "")
        return plain_json(d.get("id")) if isinstance(d, dict) else None
    except (ValueError, RecursionError):
        return None
