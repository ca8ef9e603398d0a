"""The front end's end of the wire to the engine core (``service/ipc.py``).

``call(op, *args)`` queues a request and returns a future; everything queued during one turn of the
event loop leaves as one ZeroMQ message. A reader task resolves futures from the engine core's
answers and hands pushed events (session expiry) to listeners. A socket monitor notices at once when
the engine core's end closes (crash or restart): pending requests fail with 503 ``engine_unavailable``
and new ones are refused until it is back and has answered ``hello`` again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from service.errors import ServiceError
from service.ipc import EVENT, OK, pack, raise_error, unpack

log = logging.getLogger("psn.frontend")


class EngineUnavailable(ServiceError):
    status, code = 503, "engine_unavailable"


class EngineClient:
    def __init__(self, address: str):
        self.address = address
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue requests for an engine core that is not there
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 50)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(address)
        self._rid = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._outbox: list[list[Any]] = []
        self._flush_scheduled = False
        self._tasks: list[asyncio.Task] = []
        self.connected = False  # a live connection to the engine core that has answered hello
        self.hello: dict[str, Any] | None = None
        self.on_hello: Callable[[dict[str, Any]], None] | None = None
        self.on_event: Callable[[str, Any], None] | None = None
        self._closed = False
        self.hello_seen = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read(), name="engine-reader"),
                       loop.create_task(self._watch(), name="engine-monitor")]

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._fail_pending(EngineUnavailable("the front end is shutting down", retry_after=1))
        self._monitor.close(0)
        self.sock.close(0)
        self.ctx.term()

    # ----- requests ------------------------------------------------------------------------------
    def call(self, op: str, *args: Any) -> asyncio.Future:
        """Send ``[rid, op, *args]`` (with this turn's other requests); the future gets the result."""
        if not self.connected:
            raise EngineUnavailable("the engine core is not available (starting or restarting); retry shortly",
                                    retry_after=1)
        return self._call(op, *args)

    def _call(self, op: str, *args: Any) -> asyncio.Future:
        self._rid += 1
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending[self._rid] = fut
        self._outbox.append([self._rid, op, *args])
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        items, self._outbox = self._outbox, []
        if not items:
            return
        try:
            self.sock.send(pack(items), zmq.NOBLOCK)
        except zmq.ZMQError as e:  # no engine core connected (IMMEDIATE) or its queue is full
            err = EngineUnavailable(f"the engine core is not reachable ({e.strerror}); retry shortly", retry_after=1)
            for item in items:
                fut = self._pending.pop(item[0], None)
                if fut is not None and not fut.done():
                    fut.set_exception(err)

    async def _read(self) -> None:
        while True:
            data = await self.sock.recv(copy=False)
            try:
                answers = unpack(data.buffer)
            except Exception:
                log.warning("front end: undecodable message from the engine core")
                continue
            for rid, status, body in answers:
                if rid == EVENT:
                    if self.on_event is not None:
                        self.on_event(status, body)
                    continue
                fut = self._pending.pop(rid, None)
                if fut is None or fut.done():  # its caller gave up (client gone)
                    continue
                if status == OK:
                    fut.set_result(body)
                else:
                    fut.set_exception(raise_error(status, body))

    async def _watch(self) -> None:
        """Track the connection: hello after every (re)connect, fail everything on a disconnect."""
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                asyncio.get_running_loop().create_task(self._hello())
            elif event == zmq.EVENT_DISCONNECTED:
                if self.connected:
                    log.warning("front end: lost the engine core; refusing requests until it is back")
                self.connected = False
                self._fail_pending(EngineUnavailable("the engine core went away while this request was pending; "
                                                     "retry shortly", retry_after=1))

    async def _hello(self) -> None:
        try:
            hello = await asyncio.wait_for(self._call("hello"), 30)
        except Exception as e:  # noqa: BLE001 - the next connection event tries again
            log.warning("front end: hello to the engine core failed: %r", e)
            return
        self.hello = hello
        if self.on_hello is not None:
            self.on_hello(hello)
        self.connected = True
        self.hello_seen.set()
        log.info("front end: connected to the engine core (pid %s)", hello["engine"]["pid"])

    def _fail_pending(self, err: ServiceError) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)

    async def ping(self, timeout: float) -> bool:
        """True if the engine core answers as ready within ``timeout`` seconds."""
        if not self.connected:
            return False
        try:
            res = await asyncio.wait_for(self.call("ping"), timeout)
        except (TimeoutError, ServiceError):
            return False
        return bool(res.get("ready"))
