"""Sessions of one service: ids, slots (a free list per model), recent outputs, idle expiry.

Plain Python bookkeeping on the event loop; the tensors live in the backends.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from service.errors import SessionGone, SessionNotFound, TooManySessions

StepOut = str  # JSON text {"index", "spikes", "scores", "predicted", "label"} of one answered step


@dataclass(eq=False)
class Session:
    id: str
    model: str
    slot: int
    created: float
    last_used: float
    recent: deque[StepOut]  # the last ``retry_window`` answered steps, oldest first
    t: int = 0  # steps applied so far (the index the next new step gets)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one request at a time, in order
    pending: asyncio.Future | None = None  # the batch item in flight, if any
    listeners: set[Callable[[Session, str], None]] = field(default_factory=set)  # told on expiry

    def busy(self) -> bool:
        return self.lock.locked() or (self.pending is not None and not self.pending.done())


class SlotPool:
    """``n`` slots of one model; a free list hands out the most recently freed first (warm in cache)."""

    def __init__(self, n: int):
        self.size = n
        self._free = list(range(n - 1, -1, -1))

    def take(self) -> int | None:
        return self._free.pop() if self._free else None

    def give(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def in_use(self) -> int:
        return self.size - len(self._free)


class SessionTable:
    """Every live session by id, plus the ids that expired or were closed (answered 410, not 404)."""

    def __init__(self, idle_timeout_s: float, retry_window: int, remember_gone: int):
        self.idle_timeout_s, self.retry_window, self.remember_gone = idle_timeout_s, retry_window, remember_gone
        self.live: dict[str, Session] = {}
        self.pools: dict[str, SlotPool] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()  # id -> "session_expired" | "session_closed"

    def add_model(self, name: str, slots: int) -> None:
        self.pools[name] = SlotPool(slots)

    def open(self, model: str) -> Session:
        slot = self.pools[model].take()
        if slot is None:
            raise TooManySessions(f"model {model!r}: all {self.pools[model].size} session slots are in use; close a "
                                  f"session or wait for one to expire (idle timeout {self.idle_timeout_s:g} s)",
                                  retry_after=min(self.idle_timeout_s, 30.0))
        now = time.monotonic()
        sid = secrets.token_urlsafe(16)
        s = Session(id=sid, model=model, slot=slot, created=now, last_used=now, recent=deque(maxlen=self.retry_window))
        self.live[sid] = s
        return s

    def get(self, sid: str) -> Session:
        s = self.live.get(sid)
        if s is not None:
            return s
        gone = self._gone.get(sid)
        if gone == "session_expired":
            raise SessionGone(f"session {sid!r} expired after {self.idle_timeout_s:g} s without requests; "
                              "open a new one", field="session_id", code="session_expired")
        if gone == "session_closed":
            raise SessionGone(f"session {sid!r} was closed", field="session_id", code="session_closed")
        raise SessionNotFound(f"session {sid!r} does not exist", field="session_id")

    def close(self, s: Session, reason: str = "session_closed") -> None:
        """Free ``s``'s slot and remember its id; listeners hear ``reason``."""
        if self.live.pop(s.id, None) is None:
            return
        self.pools[s.model].give(s.slot)
        s.slot = -1  # marks the session closed for requests that were waiting on its lock
        if self.remember_gone:
            self._gone[s.id] = reason
            while len(self._gone) > self.remember_gone:
                self._gone.popitem(last=False)
        for listener in list(s.listeners):
            listener(s, reason)
        s.listeners.clear()

    def expire_idle(self, now: float | None = None) -> list[Session]:
        """Close every session idle for longer than the timeout and not busy; returns them."""
        now = time.monotonic() if now is None else now
        old = [s for s in self.live.values() if now - s.last_used > self.idle_timeout_s and not s.busy()]
        for s in old:
            self.close(s, "session_expired")
        return old

    def count(self, model: str) -> int:
        return self.pools[model].in_use
