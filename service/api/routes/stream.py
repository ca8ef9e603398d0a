"""WS /v1/stream: open or attach to a session, then stream steps; answers come back in order.

Client messages (JSON text): ``{"type": "open", "model"}``, ``{"type": "attach", "session_id"}``,
``{"type": "steps", "steps", "start"?, "id"?}``, ``{"type": "close"}``.
Server messages: ``opened`` / ``attached`` (with ``session``), ``steps`` (``outputs``), ``closed``,
``expired`` (pushed when the idle timeout closes the session), ``error`` (``error.code``,
``error.message``, ``error.field``); after an error the connection stays usable.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import Field, TypeAdapter, ValidationError
from uvicorn.protocols.utils import ClientDisconnected

from service.api.views import session_info
from service.deps import get_engine
from service.encode import join_object
from service.engine.engine import Engine
from service.engine.sessions import Session
from service.errors import InvalidInput, RequestTooLarge, ServiceError
from service.inputs import parse_steps
from service.schemas import WsAttach, WsClose, WsOpen, WsSteps

router = APIRouter(tags=["stream"])
log = logging.getLogger("psn.stream")

ClientMessage = TypeAdapter(Annotated[WsOpen | WsAttach | WsSteps | WsClose, Field(discriminator="type")])


class StreamConnection:
    """One WebSocket: at most one current session; sends are serialised (expiry pushes interleave)."""

    def __init__(self, ws: WebSocket, engine: Engine):
        self.ws, self.engine = ws, engine
        self.session: Session | None = None
        self.send_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()

    async def send(self, msg: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(msg))

    async def send_error(self, err: ServiceError, msg_id: Any = None) -> None:
        self.engine.metrics.errors.labels(err.code).inc()
        await self.send({"type": "error", "error": err.body()["error"], "id": msg_id})

    def _on_session_end(self, s: Session, reason: str) -> None:
        # self.session stays: the next message about it is answered 410 session_expired / session_closed
        if reason == "session_expired":
            task = asyncio.get_running_loop().create_task(self._push_expired(s))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _push_expired(self, s: Session) -> None:
        try:
            await self.send({"type": "expired", "session_id": s.id, "error": {
                "code": "session_expired", "message": f"session {s.id!r} expired after "
                f"{self.engine.settings.idle_timeout_s:g} s without requests", "field": "session_id"}})
        except Exception:  # the client has gone
            pass

    def _bind(self, s: Session) -> None:
        if self.session is not None:
            self.session.listeners.discard(self._on_session_end)
        self.session = s
        s.listeners.add(self._on_session_end)

    async def handle(self, text: str) -> None:
        if len(text) > self.engine.settings.max_request_bytes:
            raise RequestTooLarge(f"message: {len(text)} bytes, at most {self.engine.settings.max_request_bytes} "
                                  "allowed (PSN_MAX_REQUEST_BYTES)", field="message")
        try:
            msg = ClientMessage.validate_json(text)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "message"
            raise InvalidInput(f"{field}: {first['msg']} (message types: open, attach, steps, close)",
                               field=field) from None
        engine = self.engine
        if isinstance(msg, WsSteps):
            s = self._current()
            me = engine.models[s.model]
            x = parse_steps(msg.steps, me.cfg.input_shape, me.backend.dtype, engine.settings.max_steps_per_request)
            engine.check_open()
            start, outputs, replayed = await me.step(s, x, msg.start)
            text = join_object({"type": "steps", "session_id": s.id, "id": msg.id, "start": start,
                                "replayed": replayed}, outputs)
            async with self.send_lock:
                await self.ws.send_text(text)
        elif isinstance(msg, WsOpen):
            s = await engine.open_session(msg.model)
            self._bind(s)
            await self.send({"type": "opened", "session": session_info(engine, s)})
        elif isinstance(msg, WsAttach):
            s = engine.sessions.get(msg.session_id)
            self._bind(s)
            await self.send({"type": "attached", "session": session_info(engine, s)})
        else:
            s = self._current()
            s.listeners.discard(self._on_session_end)
            self.session = None
            await engine.close_session(s)
            await self.send({"type": "closed", "session_id": s.id})

    def _current(self) -> Session:
        if self.session is None:
            raise InvalidInput("no session on this connection: send {\"type\": \"open\", \"model\": ...} or "
                               "{\"type\": \"attach\", \"session_id\": ...} first", field="type")
        return self.engine.sessions.get(self.session.id)  # 410 if it has expired meanwhile


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    await ws.accept()
    try:
        engine = get_engine(ws)
    except ServiceError as e:
        await ws.send_text(json.dumps({"type": "error", "error": e.body()["error"]}))
        await ws.close(code=1013)
        return
    conn = StreamConnection(ws, engine)
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            text = msg.get("text")
            if text is None:
                await conn.send_error(InvalidInput("message: expected a JSON text frame, got binary", field="message"))
                continue
            try:
                await conn.handle(text)
            except ServiceError as e:
                await conn.send_error(e, _msg_id(text))
            except (WebSocketDisconnect, ClientDisconnected):
                raise
            except Exception as e:  # a bug, not bad input: say so and keep the connection
                log.exception("unexpected error on /v1/stream")
                await conn.send_error(ServiceError(f"internal error: {type(e).__name__}", status=500,
                                                   code="internal"), _msg_id(text))
    except (WebSocketDisconnect, ClientDisconnected):
        pass
    except RuntimeError as e:  # starlette: sending on a socket the client has already closed
        log.debug("websocket gone: %s", e)
    finally:
        if conn.session is not None:
            conn.session.listeners.discard(conn._on_session_end)


def _msg_id(text: str) -> Any:
    try:
        d = json.loads(text)
        return d.get("id") if isinstance(d, dict) else None
    except ValueError:
        return None
