"""Per-key limits of the engine core: live sessions per owner, and steps per second per owner.

An owner is the short id a front end derives from an API key's hash (``service/frontend/auth.py``);
with access control off every request has owner "" and nothing here limits it. The limits live in the
engine core, not in the front ends, so they hold whichever of the ``PSN_WORKERS`` front ends serves
a request. Time comes from the engine core's clock (injected in tests).

Steps per second is a token bucket per owner: it refills at ``PSN_KEY_STEPS_PER_S`` up to a burst
of that many steps or one largest request (``PSN_MAX_STEPS_PER_REQUEST``), whichever is more, so any
valid request can pass once the bucket has refilled. Every step sent counts when the request is
admitted (a retried step too: admission cannot tell it apart before it runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from service.config import Settings
from service.errors import RateLimited, TooManyKeySessions


class TokenBucket:
    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate, self.capacity = rate, capacity
        self.tokens, self.stamp = capacity, now

    def wait_s(self, n: float, now: float) -> float:
        """Seconds until ``n`` tokens are there (0: now); refills first."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if self.tokens >= n else (n - self.tokens) / self.rate

    def take(self, n: float) -> None:
        self.tokens -= n


class OwnerQuotas:
    def __init__(self, settings: Settings, clock: Callable[[], float]):
        self.max_sessions = settings.key_max_sessions  # 0: off
        self.rate = settings.key_steps_per_s  # 0: off
        self.burst = max(self.rate, settings.max_steps_per_request)
        self.idle_timeout_s = settings.idle_timeout_s
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}  # one per owner that has sent steps (owners are API keys: few)

    def check_open(self, owner: str, live: int) -> None:
        """Refuse a new session to ``owner``, which holds ``live`` sessions, past PSN_KEY_MAX_SESSIONS."""
        if owner and self.max_sessions and live >= self.max_sessions:
            raise TooManyKeySessions(f"this API key already holds {live} live sessions (PSN_KEY_MAX_SESSIONS="
                                     f"{self.max_sessions}); close one, or wait for one to expire (idle timeout "
                                     f"{self.idle_timeout_s:g} s)", retry_after=min(self.idle_timeout_s, 30.0))

    def check_steps(self, owner: str, n: int) -> None:
        """Refuse ``n`` steps to ``owner`` if its bucket does not hold them now (nothing is taken)."""
        if not owner or not self.rate:
            return
        bucket = self.buckets.get(owner)
        now = self.clock()
        if bucket is None:
            bucket = self.buckets[owner] = TokenBucket(self.rate, self.burst, now)
        wait = bucket.wait_s(n, now)
        if wait > 0:
            raise RateLimited(f"steps: this API key may send {self.rate:g} steps per second (PSN_KEY_STEPS_PER_S, "
                              f"bursts up to {self.burst:g}); {n} more fit in {wait:.3g} s", field="steps",
                              retry_after=math.ceil(wait))

    def take_steps(self, owner: str, n: int) -> None:
        """Count ``n`` admitted steps (after ``check_steps`` passed in the same turn)."""
        bucket = self.buckets.get(owner) if owner and self.rate else None
        if bucket is not None:
            bucket.take(n)
