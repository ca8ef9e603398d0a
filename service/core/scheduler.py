"""Which pending requests run together: plain Python decisions, no tensors (the runner owns those).

Each session's requests wait in its own queue (``Session.queue``) and run strictly in order, one per
batch. Sessions with pending work wait their turn in ``ready``: a batch takes the first
``max_batch_size`` of them, and a session that still has work after its request ran goes to the back.
So a client that floods one session gets one step request per batch, like everyone else.

A batch is due when ``max_batch_size`` sessions are waiting, or when the request that has waited
longest is ``max_wait_s`` old. Time comes from the caller (an injected clock in tests).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.sessions import Session
from service.errors import SessionQueueFull


@dataclass(eq=False, slots=True)
class Request:
    """One queued request of a session: ``op`` is "steps" or "close"."""

    front: bytes  # the front end that asked (its connection's identity in the engine core)
    rid: int
    session: Session
    op: str
    arrived: float
    start: int = -1  # steps: first index, -1 = append
    L: int = 0  # steps in the payload
    payload: Any = None  # L * prod(input_shape) floats, wire dtype


@dataclass(eq=False, slots=True)
class Item:
    """A step request that needs the backend: its last ``n_new`` steps are new."""

    req: Request
    start: int
    replayed: int
    n_new: int
    payload: bytes
    cached: tuple[np.ndarray, np.ndarray] | None  # outputs of the replayed steps (retry window)


@dataclass(eq=False)
class Batch:
    requests: list[Request]  # everything scheduled (each is answered exactly once by commit)
    runs: dict[int, list[Item]] = field(default_factory=dict)  # new-step count -> items
    inputs: dict[int, bytes] = field(default_factory=dict)  # new-step count -> the items' payloads, joined


@dataclass(eq=False, slots=True)
class ClassifyRequest:
    front: bytes
    rid: int
    T: int
    payload: bytes
    arrived: float


class Scheduler:
    def __init__(self, max_batch_size: int, max_wait_s: float, session_queue: int = 1 << 30):
        self.max_batch_size, self.max_wait_s, self.session_queue = max_batch_size, max_wait_s, session_queue
        self.ready: deque[Session] = deque()  # sessions with queued requests, in turn order
        self.pending = 0  # queued requests, all sessions

    def add(self, req: Request, bounded: bool = True) -> None:
        """Queue ``req`` behind its session's other requests, at most ``session_queue`` of them (``bounded``
        false: a close that is part of the request queued just before it, an OIP ``sequence_end``)."""
        s = req.session
        if bounded and len(s.queue) >= self.session_queue:
            raise SessionQueueFull.waiting(s.id, len(s.queue))
        s.queue.append(req)
        if len(s.queue) == 1:
            self.ready.append(s)
        self.pending += 1

    def _oldest(self) -> float:
        return min(self.ready[i].queue[0].arrived for i in range(min(len(self.ready), self.max_batch_size)))

    def wait_s(self, now: float) -> float | None:
        """Seconds until a batch is due (0: now), None when nothing is pending."""
        if not self.ready:
            return None
        if len(self.ready) >= self.max_batch_size:
            return 0.0
        return max(0.0, self._oldest() + self.max_wait_s - now)

    def schedule(self, now: float, force: bool = False) -> list[Request]:
        """The next batch (the head request of up to ``max_batch_size`` sessions), or [] if none is due.

        ``force``: take what is pending even if the batch is not due (draining).
        """
        wait = self.wait_s(now)
        if wait is None or (wait > 0 and not force):
            return []
        n = min(len(self.ready), self.max_batch_size)
        return [self.ready.popleft().queue[0] for _ in range(n)]

    def done(self, batch: list[Request]) -> None:
        """The batch has been answered: drop each request; sessions with more work go to the back."""
        for req in batch:
            s = req.session
            s.queue.popleft()
            if s.queue:
                self.ready.append(s)
        self.pending -= len(batch)

    def take_head(self, s: Session) -> Request:
        """Take ``s``'s head request out of turn (the engine core runs it now); ``s`` keeps its place in the
        turn order if it has more."""
        req = s.queue.popleft()
        self.pending -= 1
        if not s.queue:
            self.ready.remove(s)
        return req

    def drop(self, s: Session) -> list[Request]:
        """Remove a session's queued requests (it is gone); returns them so they can be answered."""
        if not s.queue:
            return []
        reqs = list(s.queue)
        s.queue.clear()
        try:
            self.ready.remove(s)
        except ValueError:
            pass
        self.pending -= len(reqs)
        return reqs
