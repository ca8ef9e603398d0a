"""The front end's end of the wire to the engine core (``service/ipc.py``).

``call(op, *args)`` queues a request and returns a future; everything queued during one turn of the
event loop leaves as one frame. A reader task resolves futures from the engine core's answers and
hands pushed events (session expiry) to a listener. When the connection ends (the engine core
crashed or is restarting), pending requests fail at once with 503 ``engine_unavailable``, new ones
are refused, and the client reconnects every 50-500 ms, then says ``hello`` again.

A request without an answer after ``timeout_s`` fails with 504 ``request_timeout`` (the engine core
refuses what it could not run by ``PSN_REQUEST_TIMEOUT_S`` itself; this is for an engine core that is
stuck). A sweeper checks a few times a second, so a request costs nothing extra: requests are issued in
rid order, and each tick notes the last rid issued by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from service.errors import InvalidInput, RequestTimeout, ServiceError
from service.ipc import EVENT, LENGTH, MAX_FRAME, OK, frame, parse_address, raise_error, unpack

log = logging.getLogger("psn.frontend")


class EngineUnavailable(ServiceError):
    status, code = 503, "engine_unavailable"


class EngineClient:
    def __init__(self, address: str, timeout_s: float = 60.0):
        self.address, self.timeout_s = address, timeout_s
        self._marks: deque[tuple[float, int]] = deque()  # (time, last rid issued by then), one per sweep
        self.kind, self.where, self.port = parse_address(address)
        self._rid = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._outbox: list[list[Any]] = []
        self._flush_scheduled = False
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self.connected = False  # connected, and the engine core has answered hello
        self.hello: dict[str, Any] | None = None
        self.hello_seen = asyncio.Event()
        self.on_hello: Callable[[dict[str, Any]], None] | None = None
        self.on_event: Callable[[str, Any], None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="engine-client")
        self._sweeper = loop.create_task(self._sweep(), name="engine-client-timeouts")

    async def close(self) -> None:
        self.connected = False  # a planned close: not "lost the engine core"
        for task in (self._task, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._disconnected(EngineUnavailable("the front end is shutting down", retry_after=1))

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
        if self._writer is None or self._writer.is_closing():
            err = EngineUnavailable("the engine core is not reachable; retry shortly", retry_after=1)
            for item in items:
                fut = self._pending.pop(item[0], None)
                if fut is not None and not fut.done():
                    fut.set_exception(err)
            return
        try:
            data = frame(items)
        except (OverflowError, TypeError, ValueError):  # a value the IPC cannot carry: refuse that request only
            good = [item for item in items if self._encodes(item)]
            if not good:
                return
            data = frame(good)
        self._writer.write(data)

    def _encodes(self, item: list[Any]) -> bool:
        """Whether ``item`` can be sent to the engine core; if not, its caller gets a 422 (validation should
        have refused it before: this keeps one request's bad value from losing the turn's other requests)."""
        try:
            frame([item])
            return True
        except (OverflowError, TypeError, ValueError) as e:
            fut = self._pending.pop(item[0], None)
            if fut is not None and not fut.done():
                fut.set_exception(InvalidInput(f"request: a value cannot be sent to the engine core ({e})",
                                               field="request"))
            return False

    async def _sweep(self) -> None:
        """Fail requests that have waited longer than ``timeout_s`` (to within one tick)."""
        loop = asyncio.get_running_loop()
        tick = min(0.25, self.timeout_s / 4)
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            self._marks.append((now, self._rid))
            cutoff = 0  # every rid up to this one was issued more than timeout_s ago
            while self._marks and self._marks[0][0] <= now - self.timeout_s:
                cutoff = self._marks.popleft()[1]
            expired = []
            for rid in self._pending:  # oldest first (insertion order is rid order)
                if rid > cutoff:
                    break
                expired.append(rid)
            if not expired:
                continue
            err = RequestTimeout(f"no answer from the engine core within {self.timeout_s:g} s; the request may or "
                                 "may not have been applied (resend steps with start to find out)", retry_after=1)
            for rid in expired:
                fut = self._pending.pop(rid)
                if not fut.done():
                    fut.set_exception(err)

    # ----- the connection --------------------------------------------------------------------------
    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                if self.kind == "unix":
                    reader, writer = await asyncio.open_unix_connection(self.where)
                else:
                    reader, writer = await asyncio.open_connection(self.where, self.port)
            except OSError:
                await asyncio.sleep(delay)
                delay = min(0.5, delay * 2)
                continue
            delay = 0.05
            self._writer = writer
            hello = asyncio.get_running_loop().create_task(self._hello())
            try:
                await self._read(reader)
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                pass
            except Exception:  # noqa: BLE001 - a frame it cannot take (a broken peer, a failing event listener):
                # drop the connection and make it again, as for an oversized frame; never end this task for good
                log.exception("front end: an answer from the engine core could not be handled; reconnecting")
            finally:
                hello.cancel()
                if self.connected:
                    log.warning("front end: lost the engine core; refusing requests until it is back")
                self._disconnected(EngineUnavailable("the engine core went away while this request was pending; "
                                                     "retry shortly", retry_after=1))
                writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            (n,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
            if n > MAX_FRAME:
                raise ConnectionError(f"a {n}-byte frame from the engine core")
            answers = unpack(await reader.readexactly(n))
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

    async def _hello(self) -> None:
        try:
            hello = await asyncio.wait_for(self._call("hello"), 30)
        except Exception as e:  # noqa: BLE001 - the connection is useless without it: drop it and retry
            log.warning("front end: hello to the engine core failed: %r", e)
            if self._writer is not None:
                self._writer.close()
            return
        self.hello = hello
        self.connected = True  # before on_hello: it may send requests (re-watching sessions)
        if self.on_hello is not None:
            try:
                self.on_hello(hello)
            except Exception:  # a bug there must not leave the front end disconnected for good
                log.exception("front end: handling the engine core's hello failed")
        self.hello_seen.set()
        log.info("front end: connected to the engine core (pid %s)", hello["engine"]["pid"])

    def _disconnected(self, err: ServiceError) -> None:
        self.connected = False
        self._writer = None
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)

    async def ping(self, timeout: float) -> bool:
        """True if the engine core answers as ready within ``timeout`` seconds."""
        return (await self.readiness(timeout)) is not None

    async def readiness(self, timeout: float) -> dict | None:
        """The engine core's answer to ``ping`` if it answers as ready within ``timeout`` seconds, else None."""
        if not self.connected:
            return None
        try:
            res = await asyncio.wait_for(self.call("ping"), timeout)
        except (TimeoutError, ServiceError):
            return None
        return res if res.get("ready") else None
