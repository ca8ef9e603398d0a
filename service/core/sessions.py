"""The session table of the engine core: ids, slots (a free list per model), idle expiry, and the
ids that are gone (answered 410, not 404). Plain Python; time comes from an injected clock.

A session's ``queue`` holds its requests in arrival order: the engine core applies them strictly
one after another, so a session with queued work is busy and never expires.

With access control on, a session belongs to the ``owner`` that opened it (a short id the front ends
derive from the API key's hash): to any other owner its id is answered exactly as an id that never
existed, live or gone. Live sessions are counted per owner.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import ServiceError, SessionGone, SessionLost, SessionMoved, SessionNotFound, TooManySessions

ID_LENGTH = 24  # a generated session id: 4 characters of issuer tag, 16 random, 4 of check


def new_tag() -> str:
    """An issuer tag: 4 url-safe characters naming one session store (or one run without a store)."""
    return secrets.token_urlsafe(3)


def _check(body: str) -> str:
    return base64.urlsafe_b64encode(hashlib.blake2b(body.encode(), digest_size=3, person=b"psn-sid").digest()).decode()


def make_id(tag: str) -> str:
    """A new session id issued under ``tag``: ``tag + random + check`` (the check is not a secret: it
    tells an id this service issued from a mistyped or made-up one, so an id of a lost store can be
    answered 410 session_lost instead of 404)."""
    body = tag + secrets.token_urlsafe(12)
    return body + _check(body)


def id_tag(sid: str) -> str | None:
    """The issuer tag of a well-formed generated id, else None."""
    if len(sid) != ID_LENGTH or _check(sid[:-4]) != sid[-4:]:
        return None
    return sid[:4]


@dataclass(eq=False)
class Session:
    id: str
    model: str
    slot: int  # -1 once closed
    last_used: float
    t: int = 0  # steps applied so far (the index the next new step gets)
    queue: deque[Any] = field(default_factory=deque)  # pending requests, oldest first
    watchers: set[bytes] = field(default_factory=set)  # front ends told when it expires
    ended: str = ""  # once closed: session_closed | session_expired | session_lost
    owner: str = ""  # who opened it ("" with access control off); no one else can see it; kept in the session log

    @property
    def busy(self) -> bool:
        return bool(self.queue)


class SlotPool:
    """``n`` slots of one model; the most recently freed slot is handed out first (warm in cache)."""

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
    """Every live session by id, plus the ids that expired or were closed."""

    def __init__(self, idle_timeout_s: float, remember_gone: int, clock: Callable[[], float], tag: str | None = None):
        self.idle_timeout_s, self.remember_gone, self.clock = idle_timeout_s, remember_gone, clock
        self.tag = tag or new_tag()  # the issuer tag of new ids (a session store keeps its own across restarts)
        self.live: dict[str, Session] = {}
        self.pools: dict[str, SlotPool] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()  # id -> session_expired | session_closed | session_lost
        self.on_close: Callable[[Session, str], None] | None = None  # the session log's hook
        self._gone_owner: dict[str, str] = {}  # id -> its owner, for the ids in _gone whose owner is not ""
        self._gone_of: dict[str, OrderedDict[str, None]] = {}  # owner -> its ids in _gone, oldest first
        self.owned: Counter[str] = Counter()  # owner -> live sessions

    def add_model(self, name: str, slots: int) -> None:
        self.pools[name] = SlotPool(slots)

    def open(self, model: str, sid: str | None = None, owner: str = "") -> Session:
        """A new session of ``model`` (``sid``: a caller-chosen id, e.g. an OIP sequence; default: a new one)."""
        pool = self.pools[model]
        slot = pool.take()
        if slot is None:
            raise TooManySessions(f"model {model!r}: all {pool.size} session slots are in use; close a session or "
                                  f"wait for one to expire (idle timeout {self.idle_timeout_s:g} s)",
                                  retry_after=min(self.idle_timeout_s, 30.0))
        s = Session(id=sid or make_id(self.tag), model=model, slot=slot, last_used=self.clock(), owner=owner)
        self.live[s.id] = s
        if sid is not None:  # a reused id (OIP) is live, not ended
            self._forget(sid)
        self.owned[owner] += 1
        return s

    def get(self, sid: str, owner: str = "") -> Session:
        """Session ``sid`` if ``owner`` opened it; else what a request to it is told (another owner's id: 404)."""
        s = self.live.get(sid)
        if s is not None and s.owner == owner:
            return s
        raise self.gone_error(sid, owner=owner) if s is None else self.not_found(sid)

    def gone_error(self, sid: str, reason: str | None = None, owner: str = "") -> ServiceError:
        """What a request to ``sid`` (not live) is told: 410 with why it went, or 404 if it never existed
        (or was forgotten, or is another owner's). ``reason``: the known reason of a session that just went."""
        gone = reason or (self._gone.get(sid) if self._gone_owner.get(sid, "") == owner else None)
        if gone == "session_expired":
            return SessionGone(f"session {sid!r} expired after {self.idle_timeout_s:g} s without requests; "
                               "open a new one", field="session_id", code="session_expired")
        if gone == "session_closed":
            return SessionGone(f"session {sid!r} was closed", field="session_id", code="session_closed")
        if gone == "session_moved":
            return SessionMoved(f"session {sid!r} moved to another replica; reconnect and re-send from the last "
                                "acknowledged step with start", field="session_id")
        if gone == "session_lost":
            return SessionLost(f"session {sid!r} was lost: its state could not be trusted or rebuilt (a model step "
                               "failed part-way, or its record in the session store was missing or unusable after a "
                               "restart); open a new session and resend its inputs", field="session_id")
        tag = id_tag(sid)
        if tag is not None and tag != self.tag:
            return SessionLost(f"session {sid!r} was lost: it was opened before the engine restarted, and this run "
                               "has no record of it (no session store, PSN_STATE_DIR / PSN_STATE_URL, or another "
                               "one); open a new session and resend its inputs", field="session_id")
        return self.not_found(sid)

    @staticmethod
    def not_found(sid: str) -> SessionNotFound:
        return SessionNotFound(f"session {sid!r} does not exist", field="session_id")

    def remember(self, sid: str, reason: str, owner: str = "") -> None:
        """Answer ``sid`` with ``reason`` (session_closed | session_expired | session_lost) from now on (to
        ``owner``; anyone else gets 404).

        Past ``remember_gone`` ids one is forgotten: the oldest of ``owner``'s if it holds more than the
        average owner, else the oldest of the owner that holds the most (with one owner, as with access
        control off: the oldest id). So a key that opens and closes sessions in a loop pushes out its own
        ended ids, and another key's only down to an equal share of the limit."""
        if not self.remember_gone:
            return
        self._forget(sid)
        self._gone[sid] = reason
        if owner:
            self._gone_owner[sid] = owner
        mine = self._gone_of.setdefault(owner, OrderedDict())
        mine[sid] = None
        while len(self._gone) > self.remember_gone:
            # an owner over its fair share pays first; else (rarely) the owner that holds the most
            heavy = mine if len(mine) * len(self._gone_of) > len(self._gone) else max(self._gone_of.values(), key=len)
            self._forget(next(iter(heavy)))

    def _forget(self, sid: str) -> None:
        """``sid`` is no longer remembered as gone (if it was)."""
        if self._gone.pop(sid, None) is None:
            return
        owner = self._gone_owner.pop(sid, "")
        ids = self._gone_of[owner]
        del ids[sid]
        if not ids:
            del self._gone_of[owner]

    def gone(self) -> list[tuple[str, str, str]]:
        """The remembered ids that are gone, oldest first: (id, why, owner)."""
        return [(sid, why, self._gone_owner.get(sid, "")) for sid, why in self._gone.items()]

    def close(self, s: Session, reason: str = "session_closed", remember: bool = True) -> None:
        """Free ``s``'s slot and remember its id as ``reason`` (``remember=False``: its id is opened again at
        once, an OIP sequence started over, so it takes no place among the ended ids)."""
        if self.live.pop(s.id, None) is None:
            return
        self.pools[s.model].give(s.slot)
        s.slot, s.ended = -1, reason
        self.owned[s.owner] -= 1
        if not self.owned[s.owner]:
            del self.owned[s.owner]
        if remember and reason != "session_moved":  # moved: another replica serves it, asking here claims it back
            self.remember(s.id, reason, s.owner)
        if self.on_close is not None:
            self.on_close(s, reason)

    def expire_idle(self) -> list[Session]:
        """Close every session idle (no request) for longer than the timeout and not busy."""
        now = self.clock()
        old = [s for s in self.live.values() if now - s.last_used > self.idle_timeout_s and not s.busy]
        for s in old:
            self.close(s, "session_expired")
        return old

    def count(self, model: str) -> int:
        return self.pools[model].in_use


class StepRing:
    """The last ``size`` steps of each slot, one fixed-size row per step: ``(slots, size, *row)``,
    preallocated. A batch is written with one fancy-indexed assignment (no Python object per step);
    step ``i`` of a slot lives at ``i % size``."""

    def __init__(self, slots: int, size: int, row: tuple[int, ...], dtype: np.dtype | type):
        self.size = size
        self.data = np.zeros((slots, max(size, 1), *row), dtype)

    def write(self, slots: np.ndarray, t0: np.ndarray, rows: np.ndarray) -> None:
        """Row ``b`` of ``rows`` (B, L, *row): slot ``slots[b]`` took steps ``t0[b] .. t0[b] + L - 1``."""
        if not self.size:
            return
        L = rows.shape[1]
        keep = min(L, self.size)  # of a chunk longer than the ring only its last steps are kept
        pos = (t0[:, None] + np.arange(L - keep, L)[None, :]) % self.size  # (B, keep)
        self.data[slots[:, None], pos] = rows[:, L - keep:]

    def first_kept(self, t: int) -> int:
        """The oldest step index of a slot at ``t`` that is still here."""
        return t - min(t, self.size)

    def read(self, slots: np.ndarray, start: np.ndarray, n: int) -> np.ndarray:
        """Steps ``start[b] .. start[b] + n - 1`` of ``slots[b]``: (B, n, *row)."""
        pos = (start[:, None] + np.arange(n)[None, :]) % max(self.size, 1)
        return self.data[slots[:, None], pos]


class RetryWindow:
    """The outputs of each slot's last ``size`` steps, so a retried request is answered, not re-applied:
    packed spikes and scores, one ``StepRing`` each."""

    def __init__(self, slots: int, size: int, spike_bytes: int, classes: int, dtype: np.dtype):
        self.size = size
        self.spikes = StepRing(slots, size, (spike_bytes,), np.uint8)
        self.scores = StepRing(slots, size, (classes,), dtype)

    def write(self, slots: np.ndarray, t0: np.ndarray, spikes: np.ndarray, scores: np.ndarray) -> None:
        """Rows ``b``: slot ``slots[b]`` took steps ``t0[b] .. t0[b] + L - 1``; ``spikes`` (B, L, nb)."""
        self.spikes.write(slots, t0, spikes)
        self.scores.write(slots, t0, scores)

    def first_kept(self, t: int) -> int:
        """The oldest step index of a session at ``t`` whose outputs are still here."""
        return self.spikes.first_kept(t)

    def read(self, slot: int, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        where, at = np.array([slot]), np.array([start])
        return self.spikes.read(where, at, n)[0], self.scores.read(where, at, n)[0]
