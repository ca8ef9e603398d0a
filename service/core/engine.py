"""The engine core's logic, without the process around it: requests in, answers out, one step at a time.

``handle(front, request)`` takes one request from a front end (``service/ipc.py`` lists them): those
that need no model work are answered at once; step requests join their session's queue. ``step()``
runs one engine step per model whose batch is due::

    batch = self.schedule(name)          # the head request of up to max_batch_size sessions, checked
    outputs = self.execute(name, batch)  # a backend call per distinct number of new steps (or fewer)
    self.commit(name, batch, outputs)    # advance t, keep the retry window, answer each request once

Answers collect in ``outbox`` (front end -> list) and leave in one message per front end per turn.
Time comes from ``clock`` (injected in tests), so idle expiry and batch deadlines are testable.

With access control on, session and step requests carry an ``owner`` (derived from the API key by
the front end): a session is visible to the owner that opened it only, and ``quotas`` holds each
owner to PSN_KEY_MAX_SESSIONS and PSN_KEY_STEPS_PER_S, whichever front end asks.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import generate_latest

from service.backends.base import Backend
from service.config import Settings
from service.core.cluster import ClusterStore
from service.core.journal import (
    END,
    HEADER,
    OPEN,
    STEPS,
    CorruptLog,
    LogSpec,
    Recovered,
    SessionLog,
    Store,
    frame,
    frame_parts,
    read_log,
    snapshot_frame,
    store_error,
)
from service.core.quotas import OwnerQuotas
from service.core.runner import ModelRunner
from service.core.scheduler import Batch, ClassifyRequest, Item, Request, Scheduler
from service.core.sessions import RetryWindow, Session, SessionTable, StepRing
from service.errors import (
    InvalidInput,
    ModelCannotStream,
    ModelNotFound,
    PastHorizon,
    QueueFull,
    RequestTimeout,
    RetryTooOld,
    ServiceError,
    ShuttingDown,
    StepGap,
    StoreUnavailable,
    TooManySessions,
    internal,
)
from service.ipc import EVENT, OK, error_answer
from service.metrics import EngineMetrics

log = logging.getLogger("psn.engine")
QUEUED = object()  # an op's result when its answer comes later (after an engine step)
UNANSWERED = -1  # the rid of a request the engine core queues itself (an OIP sequence_end's close): front ends
# drop answers to rids they did not send


def split_levels(runs: dict[int, Any]) -> list[int] | None:
    """Powers of two (highest first) whose calls run requests of these numbers of new steps (the keys of
    ``runs``) in fewer backend calls than one per distinct number, or None where they would not. Each
    call costs a fixed few hundred microseconds on a CPU however small (bench/engine.py), so a batch of
    requests of 1-16 steps takes at most 5 calls this way, not up to 16; the steps computed are the same."""
    if len(runs) < 3:  # two distinct numbers need at least two calls either way
        return None
    bits = 0
    for L in runs:
        bits |= L
    if bits.bit_count() >= len(runs):
        return None
    return [1 << b for b in range(bits.bit_length() - 1, -1, -1) if bits >> b & 1]


class EngineCore:
    def __init__(self, backends: list[Backend], settings: Settings, clock: Callable[[], float] = time.monotonic,
                 store: Store | None = None, cluster: ClusterStore | None = None):
        self.settings, self.clock = settings, clock
        self.timeout_s = settings.request_timeout_s  # a queued request not run by then is refused, not applied
        self.metrics = EngineMetrics()
        self.runners = {b.model.name: ModelRunner(b) for b in backends}
        self.sessions = SessionTable(settings.idle_timeout_s, settings.remember_gone, clock)
        self.quotas = OwnerQuotas(settings, clock)
        self.schedulers: dict[str, Scheduler] = {}
        self.windows: dict[str, RetryWindow] = {}
        self.classify_queue: dict[str, list[ClassifyRequest]] = {}
        self._batch_refused: dict[bytes, ServiceError] = {}  # front end -> why its last OIP batch was refused
        for name, r in self.runners.items():
            slots = r.backend.max_slots if r.streams else 0
            self.sessions.add_model(name, slots)
            self.schedulers[name] = Scheduler(settings.max_batch_size, settings.max_wait_ms / 1000,
                                              settings.session_queue)
            self.windows[name] = RetryWindow(slots, settings.retry_window, r.spike_bytes, r.classes, r.wire)
            self.classify_queue[name] = []
        self.outbox: dict[bytes, list[Any]] = {}
        self.ready = False
        self.closing = False
        self._ops: dict[str, Callable[..., Any]] = {
            "hello": self.hello, "ping": self.ping, "open": self.open, "get": self.get, "close": self.close,
            "steps": self.steps, "sequence": self.sequence, "classify": self.classify, "metrics": self.metrics_text}
        self.log: SessionLog | None = None  # durable sessions (service/core/journal.py)
        self.cluster = cluster  # or sessions shared by replicas (service/core/cluster.py)
        self.specs: dict[str, LogSpec] = {}
        self.input_rings: dict[str, StepRing] = {}  # each slot's last inputs, for the log's snapshots
        self._answered: dict[str, list[tuple[bytes, int]]] = {}  # cluster: this turn's answers per session
        self._records: dict[str, int] = {}  # cluster: records in each session's log since its last rewrite
        self._adopting: list[tuple[bytes, int, list[Any]]] = []  # cluster: this turn's steps for sessions to claim
        self._adopting_now = False
        if store is not None or cluster is not None:
            self.specs = {name: r.log_spec(settings.retry_window, settings.backend)
                          for name, r in self.runners.items() if r.streams}
            for name, spec in self.specs.items():
                if spec.replay:
                    slots = self.sessions.pools[name].size
                    self.input_rings[name] = StepRing(slots, spec.replay, (spec.row,), np.uint8)
        if store is not None:
            self.log = SessionLog(store, self.specs, settings.state_compact_bytes)
            self.sessions.on_close = self._log_end
        elif cluster is not None:
            self.sessions.on_close = self._cluster_end
        self._log_failures = 0
        self._log_stale = False  # a write failed: the log lacks records until it is rewritten from memory
        self._log_retry_at = 0.0  # when to try that rewrite (or a failed compaction) again
        self.recovery: dict[str, Any] = {}  # what the last recover() did
        m = self.metrics
        self._m = {name: (m.steps.labels(name), m.batch_size.labels(name), m.batch_seconds.labels(name))
                   for name in self.runners}

    # ----- in and out ------------------------------------------------------------------------
    def answer(self, front: bytes, item: list[Any]) -> None:
        box = self.outbox.get(front)
        if box is None:
            self.outbox[front] = [item]
        else:
            box.append(item)

    def take_outbox(self) -> dict[bytes, list[Any]]:
        out, self.outbox = self.outbox, {}
        return out

    def handle(self, front: bytes, request: list[Any]) -> None:
        """One request from ``front``: answered now, or queued for an engine step."""
        rid = request[0] if request and isinstance(request[0], int) else -1
        try:
            op = self._ops.get(request[1]) if len(request) > 1 and isinstance(request[1], str) else None
            if op is None:
                raise InvalidInput(f"engine: unknown request {request[:2]!r}", field="op")
            result = op(front, rid, *request[2:])
            if result is not QUEUED:
                self.answer(front, [rid, OK, result])
        except ServiceError as e:
            self.answer(front, error_answer(rid, e))
        except Exception as e:  # a bug, not bad input: answer it, keep serving
            log.exception("engine: request %r failed", request[:2])
            self.answer(front, error_answer(rid, internal(e)))

    # ----- requests ----------------------------------------------------------------------------
    def hello(self, front: bytes, rid: int) -> dict:
        return {"models": [r.info() for r in self.runners.values()],
                "engine": {"pid": os.getpid(), "ready": self.ready, "idle_timeout_s": self.settings.idle_timeout_s}}

    def ping(self, front: bytes, rid: int) -> dict:
        return {"ready": self.ready and not self.closing, "session_store": self.store_state()}

    def store_state(self) -> str | None:
        """What /readyz says of the session store: None without one, "failing" while writes to it fail (the
        service answers on, its new steps not durable: psn_session_log_stale), else "ok"."""
        if self.cluster is not None:
            return "failing" if self._log_failures else "ok"
        if self.log is None:
            return None
        return "failing" if self._log_stale else "ok"

    def runner(self, name: Any) -> ModelRunner:
        r = self.runners.get(name) if isinstance(name, str) else None
        if r is None:
            raise ModelNotFound(f"model: no model named {name!r}; available: {sorted(self.runners)}", field="model")
        return r

    def check_open(self) -> None:
        if self.closing:
            raise ShuttingDown("the service is shutting down; retry on another replica", retry_after=1)

    def open(self, front: bytes, rid: int, model: str, watch: bool = False, sid: str | None = None,
             owner: str = "", ahead: int = 0) -> dict:
        """A new session; ``sid`` names it (an OIP sequence: a live session of that id starts over).
        ``ahead``: the steps the caller sends next (an OIP request that starts a sequence): refused here,
        with the sequence left as it was, if the horizon, the model's queue or the key's step rate would
        refuse them."""
        self.check_open()
        r = self.runner(model)
        if not r.streams:
            why = ("its backend holds no session slots here (no step form loaded)" if r.cfg.streams
                   else "each output step reads the whole sequence")
            raise ModelCannotStream(f"model {model!r} ({r.cfg.neuron} neurons) cannot stream: {why}; use "
                                    "POST /v1/classify", field="model")
        old = self.sessions.live.get(sid) if sid else None
        if old is not None and old.owner != owner:  # front ends put the owner into such ids: never happens
            raise InvalidInput(f"session id {sid!r} is taken", field="session_id")
        self.quotas.check_open(owner, self.sessions.owned[owner] - (old is not None))
        if ahead:
            if r.horizon is not None and ahead > r.horizon:
                raise PastHorizon(f"steps: model {model!r} has a fixed horizon of T={r.horizon} steps; a new "
                                  f"sequence takes at most {r.horizon}, got {ahead}", field="steps")
            self._check_admission(model, owner, ahead)
        if old is not None:
            if old.busy:
                raise StepGap(f"sequence {sid!r} still has requests in flight; start it again once they are answered",
                              field="sequence_start", code="sequence_busy")
            self.sessions.close(old, remember=False)  # live again at once: no ended id is pushed out for it
        s = self.sessions.open(model, sid, owner)
        try:
            r.reset([s.slot])
        except BaseException:
            self.sessions.close(s)
            raise
        if watch:
            s.watchers.add(front)
        if self.log is not None:
            self.log.opened(model, s.id, s.owner)
        elif self.cluster is not None:
            self._records[s.id] = 0
            self.cluster.add("o", s.id, self._cluster_header(model) + frame([OPEN, model, s.id, s.owner]), s.owner)
        self.metrics.sessions_opened.labels(model).inc()
        return self.info(s)

    def lookup(self, sid: Any, verify: bool = False, owner: str = "") -> Session:
        """The live session ``sid``; in a cluster, one another replica served is claimed and rebuilt here (if it is
        ``owner``'s: the claim checks that before it moves anything).

        ``verify`` (reads and closes, not steps): in a cluster, first check that no other replica has
        claimed it since (one Redis round trip); steps need no check: their writes are fenced."""
        s = self.sessions.live.get(sid) if isinstance(sid, str) else None
        if s is not None and s.owner != owner:  # another key's, held here: 404 before anything about it is
            raise self.sessions.not_found(sid)  # checked or changed (a stale copy is not dropped for it)
        if s is not None and verify and self.cluster is not None and not s.busy and self._moved_on(s):
            s = None
        if s is None and self.cluster is not None and isinstance(sid, str):
            s = self.adopt(sid, owner)
        if s is None:
            return self.sessions.get(sid, owner)
        # another key's session (held here, or claimed from a log without its owner key): as if it did not exist
        if s.owner != owner:
            raise self.sessions.not_found(sid)
        return s

    def get(self, front: bytes, rid: int, sid: str, watch: bool = False, owner: str = "") -> dict:
        s = self.lookup(sid, verify=True, owner=owner)
        if watch:
            s.watchers.add(front)
        return self.info(s)

    def close(self, front: bytes, rid: int, sid: str, owner: str = "") -> Any:
        s = self.lookup(sid, verify=True, owner=owner)
        if s.busy:  # after the requests already queued
            now = self.clock()
            self.schedulers[s.model].add(Request(front, rid, s, "close", now))
            return QUEUED
        self.sessions.close(s)
        self._answering(s.id, front, rid)
        return self.info(s)

    def steps(self, front: bytes, rid: int, sid: str, start: int, L: int, payload: bytes, owner: str = "") -> Any:
        self.check_open()
        if self.cluster is not None and isinstance(sid, str) and sid not in self.sessions.live \
                and not self._adopting_now:
            self._adopting.append((front, rid, [rid, "steps", sid, start, L, payload, owner]))  # claimed in step()
            return QUEUED
        s = self.lookup(sid, owner=owner)
        r, sched = self.runners[s.model], self.schedulers[s.model]
        r.check_payload(payload, L)
        self._check_admission(s.model, owner, L)
        now = self.clock()
        sched.add(Request(front, rid, s, "steps", now, start, L, payload))
        self.quotas.take_steps(owner, L)
        s.last_used = now
        return QUEUED

    def sequence(self, front: bytes, rid: int, sid: str, model: str, start: bool, end: bool, L: int, payload: bytes,
                 owner: str = "") -> Any:
        """An OIP sequence request as one operation, so that no request of another client comes between its
        parts (as it could between the front end's separate open, steps and close): with ``start`` the
        sequence (re)opens, refused with the sequence as it was if it is busy or its steps would be; its
        ``L`` steps are queued; with ``end`` a close is queued right behind them, on the session they ran on,
        and runs in the engine turn that commits them (``commit``), before their answer leaves: a request
        that comes after the answer is refused as not open, and a new ``start`` opens a fresh sequence (one
        that arrives before the close has run is refused as busy; the old sequence's end never closes a
        new one). Answered as ``steps``."""
        if not isinstance(start, bool) or not isinstance(end, bool):
            raise InvalidInput("engine: sequence start and end are booleans", field="op")
        if start:
            self.open(front, rid, model, False, sid, owner, L)
        elif self.cluster is not None and isinstance(sid, str) and sid not in self.sessions.live \
                and not self._adopting_now:  # claimed in step(), then this runs again
            self._adopting.append((front, rid, [rid, "sequence", sid, model, start, end, L, payload, owner]))
            return QUEUED
        s = self.lookup(sid, owner=owner) if end else None  # the session the steps and the close go to
        result = self.steps(front, rid, sid, -1, L, payload, owner)
        if s is not None:  # one request with its steps: the close takes no place of its own in the session's
            # queue (counted, it never fitted under PSN_SESSION_QUEUE=1, and refused a start+end after the open)
            self.schedulers[s.model].add(Request(front, UNANSWERED, s, "close", self.clock()), bounded=False)
        return result

    def _check_admission(self, model: str, owner: str, L: int) -> None:
        """Would ``L`` steps of ``owner`` for ``model`` be queued now? (Nothing is taken.)"""
        if self.schedulers[model].pending >= self.settings.queue_depth:
            raise QueueFull(f"model {model!r}: {self.settings.queue_depth} requests are already queued; retry "
                            "shortly", retry_after=1)
        self.quotas.check_steps(owner, L)

    def classify(self, front: bytes, rid: int, model: str, T: int, payload: bytes, owner: str = "",
                 ahead: int = 0, follows: bool = False) -> Any:
        """One whole sequence. An OIP batch of n sequences is n of these, sent together: the first with
        ``ahead`` = n - 1 is refused, if the queue or the key's step rate would refuse all n, before anything
        is queued or counted, and the others (``follows``) are then refused with it, so a batch is never
        computed and charged part-way, then refused."""
        if follows and front in self._batch_refused:
            raise self._batch_refused[front]
        self._batch_refused.pop(front, None)
        try:
            return self._classify(front, rid, model, T, payload, owner, ahead)
        except ServiceError as e:
            if ahead:
                self._batch_refused[front] = e
            raise

    def _classify(self, front: bytes, rid: int, model: str, T: int, payload: bytes, owner: str, ahead: int) -> Any:
        self.check_open()
        r = self.runner(model)
        r.check_payload(payload, T)
        if r.exact_T is not None and T != r.exact_T:
            raise InvalidInput(f"steps: model {model!r} (plain PSN) needs exactly T={r.cfg.T} steps, got {T}",
                               field="steps")
        if r.horizon is not None and T > r.horizon:
            raise PastHorizon(f"steps: model {model!r} has a fixed horizon of T={r.horizon} steps, got {T}",
                              field="steps")
        queue = self.classify_queue[model]
        if len(queue) + ahead >= self.settings.queue_depth:
            raise QueueFull(f"model {model!r}: {self.settings.queue_depth} classify requests are queued; retry "
                            "shortly", retry_after=1)
        self.quotas.check_steps(owner, T * (1 + ahead))
        queue.append(ClassifyRequest(front, rid, T, payload, self.clock()))
        self.quotas.take_steps(owner, T)
        return QUEUED

    def metrics_text(self, front: bytes, rid: int) -> str:
        self.update_gauges()
        return generate_latest(self.metrics.registry).decode()

    def info(self, s: Session) -> dict:
        r, timeout = self.runners[s.model], self.sessions.idle_timeout_s
        return {"session_id": s.id, "model": s.model, "input_shape": list(r.input_shape), "horizon": r.horizon,
                "steps_seen": s.t, "idle_timeout_s": timeout,
                "expires_in_s": max(0.0, timeout - (self.clock() - s.last_used))}

    # ----- the engine step ---------------------------------------------------------------------
    def step(self) -> bool:
        """Run every batch that is due (all pending work while closing); True if anything ran."""
        ran = False
        if self._adopting:
            self._adopting_now = True
            try:
                self.adopt_pending()
            finally:
                self._adopting_now = False
        for name in self.runners:
            batch = self.schedule(name)
            if batch is None:
                continue
            outputs = self.execute(name, batch)
            self.commit(name, batch, outputs)
            ran = True
        for name, queue in self.classify_queue.items():
            if queue:
                self.run_classify(name)
                ran = True
        return ran

    def schedule(self, name: str) -> Batch | None:
        """The next due batch of ``name``; requests that need no backend call are answered here."""
        now = self.clock()
        requests = self.schedulers[name].schedule(now, force=self.closing)
        if not requests:
            return None
        batch = Batch(requests)
        window, r = self.windows[name], self.runners[name]
        row = r.input_size * r.wire.itemsize
        for req in requests:
            s = req.session
            try:
                if now - req.arrived > self.timeout_s:
                    raise self.timed_out(now - req.arrived)
                if s.slot < 0:
                    raise self.sessions.gone_error(s.id, s.ended)
                if req.op == "close":
                    self._close(req)
                    continue
                t, L = s.t, req.L
                start = t if req.start < 0 else req.start
                if start > t:
                    raise StepGap(f"start: session {s.id!r} has applied {t} steps, so the next step is {t}; got "
                                  f"start={start} (steps {t}..{start - 1} are missing)", field="start")
                replayed = min(t - start, L)
                cached = None
                if replayed:
                    first_kept = window.first_kept(t)
                    if start < first_kept:
                        raise RetryTooOld(f"start: steps before {first_kept} are no longer kept (the last "
                                          f"{t - first_kept} are); cannot answer a retry from {start}", field="start")
                    cached = window.read(s.slot, start, replayed)
                n_new = L - replayed
                if r.horizon is not None and t + n_new > r.horizon:
                    raise PastHorizon(f"steps: model {name!r} has a fixed horizon of T={r.horizon} steps; the session "
                                      f"is at step {t}, so at most {r.horizon - t} more fit, got {n_new}",
                                      field="steps")
                if n_new == 0:
                    assert cached is not None
                    # answered from here alone, nothing written: no fence tells us if another replica claimed it
                    if self.cluster is not None and self._moved_on(s):  # since (and moved it on, or ended it)
                        raise self.sessions.gone_error(s.id, "session_moved")
                    self.answer(req.front, [req.rid, OK, [start, replayed, t, cached[0].tobytes(),
                                                          cached[1].tobytes()]])
                    continue
                payload = req.payload[replayed * row:] if replayed else req.payload
                batch.runs.setdefault(n_new, []).append(Item(req, start, replayed, n_new, payload, cached))
            except (StepGap, RetryTooOld, PastHorizon) as e:  # in a cluster, maybe because another replica
                # has moved it on (or ended it): these are answered from here alone, nothing written to fence
                err: ServiceError = e
                if self.cluster is not None and s.slot >= 0 and self._moved_on(s):
                    err = self.sessions.gone_error(s.id, "session_moved")
                self.answer(req.front, error_answer(req.rid, err))
            except ServiceError as e:
                self.answer(req.front, error_answer(req.rid, e))
        return batch

    def _moved_on(self, s: Session) -> bool:
        """In a cluster: whether another replica has claimed ``s`` since we did (then ``s`` goes from here). One
        round trip, for answers that write nothing; a Redis that does not answer: False, the replica serves its
        own sessions on while the store is down (as it applies their steps)."""
        assert self.cluster is not None
        try:
            held = self.cluster.holds(s.id)
        except Exception as e:
            if not store_error(e):
                raise
            log.debug("cluster: checking the lease of session %s failed: %s", s.id[:8], type(e).__name__)
            return False
        if not held:
            self.moved(s.id, [])
        return not held

    def timed_out(self, waited: float) -> RequestTimeout:
        return RequestTimeout(f"the request waited {waited:.3g} s, past PSN_REQUEST_TIMEOUT_S={self.timeout_s:g} s, "
                              "and was not applied; retry later", retry_after=1)

    def execute(self, name: str, batch: Batch) -> dict[int, tuple[np.ndarray, np.ndarray] | Exception]:
        """The batch's new steps through the backend: packed spikes (B, L, nb), scores (B, L, C) per distinct
        number of new steps L, or the exception of a call that failed (its sessions are then lost).

        One backend call per distinct L, unless ``split_levels`` finds fewer calls: requests of 1-16 steps
        in one batch then take at most 5 calls (of 16, 8, 4, 2 and 1 steps), not up to 16; or one call
        for all, each request padded to the longest, where the backend can (sliding-PSN nets) and the
        padding costs less than the calls saved (``_ragged_pays``). A session's steps run in order
        whichever way (its pieces go highest first) and give the same bits (the chunk form equals step
        after step, bit for bit, and padding changes nothing before it: ``model.network``)."""
        r = self.runners[name]
        out: dict[int, tuple[np.ndarray, np.ndarray] | Exception] = {}
        t0 = time.perf_counter()
        for L, items in batch.runs.items():  # joined once: run, then the log
            batch.inputs[L] = b"".join(it.payload for it in items)
        levels = split_levels(batch.runs)
        if self._ragged_pays(r, batch.runs, len(batch.runs) if levels is None else len(levels)):
            out = self._execute_ragged(name, batch)
        elif levels is None:
            for L, items in batch.runs.items():
                try:
                    out[L] = r.run([it.req.session.slot for it in items], batch.inputs[L], L)
                except Exception as e:  # a backend failure fails these requests only; the loop keeps serving
                    log.exception("engine: backend call of model %r failed (%d sessions x %d steps)", name,
                                  len(items), L)
                    out[L] = e
        else:
            out = self._execute_split(name, batch, levels)
        if batch.runs:
            _, m_batch, m_seconds = self._m[name]
            m_batch.observe(sum(len(items) for items in batch.runs.values()))
            m_seconds.observe(time.perf_counter() - t0)
        return out

    @staticmethod
    def _ragged_pays(r: ModelRunner, runs: dict[int, list], calls: int) -> bool:
        """One ragged call (every request padded to the batch's longest) instead of ``calls`` calls, where the
        padding rows it adds cost less than the calls it saves (``ModelRunner.call_rows``)."""
        if calls < 2 or not r.ragged:
            return False
        longest = max(runs)
        padding = sum((longest - L) * len(items) for L, items in runs.items())
        return padding < (calls - 1) * r.call_rows

    def _execute_ragged(self, name: str, batch: Batch) -> dict[int, tuple[np.ndarray, np.ndarray] | Exception]:
        """``execute`` in one backend call, each request padded to the longest (``ModelRunner.run_ragged``):
        the same bits as a call per length (``PSNNet.chunk_ragged``). A failed call fails every request."""
        r = self.runners[name]
        slots, payloads, lengths = [], [], []
        for L, items in batch.runs.items():
            for it in items:
                slots.append(it.req.session.slot)
                payloads.append(it.payload)
                lengths.append(L)
        try:
            spikes, scores = r.run_ragged(slots, payloads, lengths)
        except Exception as e:  # a backend failure fails these requests only; the loop keeps serving
            log.exception("engine: backend call of model %r failed (%d sessions x up to %d steps)", name,
                          len(slots), max(lengths))
            return dict.fromkeys(batch.runs, e)
        out: dict[int, tuple[np.ndarray, np.ndarray] | Exception] = {}
        i = 0
        for L, items in batch.runs.items():
            n = len(items)
            out[L] = (np.ascontiguousarray(spikes[i:i + n, :L]), np.ascontiguousarray(scores[i:i + n, :L]))
            i += n
        return out

    def _execute_split(self, name: str, batch: Batch,
                       levels: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray] | Exception]:
        """``execute`` in pieces of ``levels`` steps (powers of two, highest first): the call of p steps takes
        every request whose L has bit p, at its steps from (the bits of L above p) on. A failed call fails
        the requests in it (slots of theirs that earlier calls advanced are then lost with them); the
        others go on."""
        r = self.runners[name]
        row = r.input_size * r.wire.itemsize
        pieces: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {L: [] for L in batch.runs}
        failed: dict[int, Exception] = {}
        for p in levels:
            members = [L for L in batch.runs if L & p and L not in failed]
            slots, data = [], []
            for L in members:
                first = (L & ~(2 * p - 1)) * row
                for it in batch.runs[L]:
                    slots.append(it.req.session.slot)
                    data.append(it.payload[first:first + p * row])
            if not slots:
                continue
            try:
                spikes, scores = r.run(slots, b"".join(data), p)
            except Exception as e:
                log.exception("engine: backend call of model %r failed (%d sessions x %d steps, part of requests "
                              "of %s steps)", name, len(slots), p, sorted(members))
                failed.update((L, e) for L in members)
                continue
            i = 0
            for L in members:
                n = len(batch.runs[L])
                pieces[L].append((spikes[i:i + n], scores[i:i + n]))
                i += n
        return {L: failed[L] if L in failed else (np.concatenate([sp for sp, _ in pieces[L]], axis=1),
                                                  np.concatenate([sc for _, sc in pieces[L]], axis=1))
                for L in batch.runs}

    def commit(self, name: str, batch: Batch, outputs: dict[int, tuple[np.ndarray, np.ndarray] | Exception]) -> None:
        """Advance each session, keep its outputs in the retry window, answer each request once."""
        window, now, steps = self.windows[name], self.clock(), 0
        for L, items in batch.runs.items():
            res = outputs[L]
            if isinstance(res, Exception):  # the call may have changed some of these slots: not to be trusted
                for it in items:
                    s = it.req.session
                    log.warning("session lost id=%s model=%s (its backend call failed)", s.id[:8], name)
                    self.sessions.close(s, "session_lost")
                    self.answer(it.req.front, error_answer(it.req.rid, self.sessions.gone_error(s.id, s.ended)))
                continue
            spikes, scores = res
            t0 = np.fromiter((it.req.session.t for it in items), np.int64, len(items))
            slots = np.fromiter((it.req.session.slot for it in items), np.int64, len(items))
            window.write(slots, t0, spikes, scores)
            if self.log is not None:  # written before this turn's answers are sent (EngineProcess.run)
                self._log_steps(name, L, items, batch.inputs[L], slots, t0, spikes, scores)
            elif self.cluster is not None:
                self._cluster_steps(name, L, items, batch.inputs[L], slots, t0, spikes, scores)
            sp_all, sc_all = spikes.tobytes(), scores.tobytes()  # one copy each; rows are slices of it
            n_sp, n_sc = len(sp_all) // len(items), len(sc_all) // len(items)
            for b, it in enumerate(items):
                s = it.req.session
                s.t += L
                s.last_used = now
                sp, sc = sp_all[b * n_sp:(b + 1) * n_sp], sc_all[b * n_sc:(b + 1) * n_sc]
                if it.cached is not None:
                    sp, sc = it.cached[0].tobytes() + sp, it.cached[1].tobytes() + sc
                self.answer(it.req.front, [it.req.rid, OK, [it.start, it.replayed, s.t, sp, sc]])
            steps += L * len(items)
        if steps:
            self._m[name][0].inc(steps)
        sched = self.schedulers[name]
        sched.done(batch.requests)
        applied = {id(it.req) for items in batch.runs.values() for it in items}
        for req in batch.requests:  # an OIP sequence's end closes in the turn of its last steps, before their
            s = req.session  # answer leaves: a client's next sequence_start must find the sequence closed
            head = s.queue[0] if s.queue else None
            if head is not None and head.rid == UNANSWERED and head.op == "close":
                sched.take_head(s)
                if s.slot >= 0 and id(req) in applied:  # steps refused in schedule(): the end is refused with them
                    self._close(head)

    def _close(self, req: Request) -> None:
        s = req.session
        self.sessions.close(s)
        self.answer(req.front, [req.rid, OK, self.info(s)])
        self._answering(s.id, req.front, req.rid)

    # ----- durable sessions -----------------------------------------------------------------------
    def _log_steps(self, name: str, L: int, items: list[Item], inputs: bytes, slots: np.ndarray, t0: np.ndarray,
                   spikes: np.ndarray, scores: np.ndarray) -> None:
        assert self.log is not None
        ring = self.input_rings.get(name)
        if ring is not None:
            ring.write(slots, t0, np.frombuffer(inputs, np.uint8).reshape(len(items), L, -1))
        self.log.steps(name, L, [it.req.session.id for it in items], t0, inputs, spikes, scores,
                       self.runners[name].score_sums(slots))

    def _log_end(self, s: Session, reason: str) -> None:
        assert self.log is not None
        self.log.ended([s.id], [reason], [s.owner])

    def flush_log(self) -> None:
        """Hand this turn's log records to the store (before the turn's answers go out); compact when due.

        A store that fails (disk full, Redis gone) is logged and serving goes on without durability
        for those records: refusing every request would turn a degraded store into an outage. The log
        then lacks records, so appending more would not make it whole: until a rewrite of the log from
        memory (every live session) succeeds, tried once a second, records are dropped."""
        if self.cluster is not None:
            self.flush_cluster()
            return
        if self.log is None:
            return
        if self._log_stale:
            self.log.pending = []  # the rewrite holds what they say
            if self.clock() < self._log_retry_at:
                return
            if not self.log.store.reachable():  # a hung store would hold the loop for a whole write timeout
                self._log_retry_at, self._log_failures = self.clock() + 1.0, self._log_failures + 1
                return
            try:
                self.compact()
            except Exception:
                self._log_retry_at = self.clock() + 1.0
                self._store_failed("session log: rewriting the log failed", "a restart")
                return
            log.warning("session log: the store takes writes again after %d failed tries; the log was rewritten "
                        "from memory, every live session is durable again", self._log_failures)
            self._log_stale, self._log_failures = False, 0
            self.metrics.log_stale.set(0)
            return
        try:
            self.log.flush()
        except Exception:
            self.log.pending = []
            self._log_stale, self._log_retry_at = True, self.clock() + 1.0
            self._log_failures = 0  # failed compactions before do not count: this one is logged
            self.metrics.log_stale.set(1)
            self._store_failed("session log: writing to the store failed", "a restart")
            return
        if self.log.due and self.clock() >= self._log_retry_at:
            try:
                self.compact()
                self._log_failures = 0
            except Exception:  # the log is whole, only longer: appends go on, the rewrite is tried again
                self._log_retry_at = self.clock() + 1.0
                self._store_failed("session log: rewriting the log as one snapshot failed", "")

    def _store_failed(self, what: str, survives: str) -> None:
        """Log a failed store write (the first, then every 1000th in a row: a dead store fails every turn)."""
        self._log_failures += 1
        if self._log_failures == 1 or self._log_failures % 1000 == 0:
            e = sys.exc_info()[1]
            log.error("%s (%d times in a row): %s: %s; %s", what, self._log_failures, type(e).__name__, e,
                      f"steps answered until it works again may not survive {survives}" if survives
                      else "the log grows until it works", exc_info=not store_error(e))  # a bug: its traceback

    def compact(self) -> None:
        """Rewrite the log as one snapshot of every live session (and the remembered ended ids)."""
        assert self.log is not None
        t0 = time.perf_counter()
        frames = [self.log.header(self.sessions.tag)]
        for name in self.log.specs:
            frames += self._snapshots(name, [s for s in self.sessions.live.values() if s.model == name])
        gone = self.sessions.gone()
        if gone:
            frames.append(frame([END, [g[0] for g in gone], [g[1] for g in gone], [g[2] for g in gone]]))
        n = self.log.rewrite(frames)
        log.info("session log compacted: %d live sessions, %d ended ids, %d bytes in %.3f s",
                 len(self.sessions.live), len(gone), n, time.perf_counter() - t0)

    def _snapshots(self, name: str, sessions: list[Session]) -> list[bytes]:
        """Snapshot frames of ``sessions`` (all of model ``name``)."""
        spec = self.specs[name]
        groups: dict[tuple[int, int], list[Session]] = {}
        for s in sessions:
            groups.setdefault((min(s.t, spec.replay or 0), min(s.t, spec.window)), []).append(s)
        r, window, ring = self.runners[name], self.windows[name], self.input_rings.get(name)
        frames = []
        for (n_in, n_out), members in groups.items():
            for i in range(0, len(members), 4096):
                chunk = members[i:i + 4096]
                slots = np.fromiter((s.slot for s in chunk), np.int64, len(chunk))
                t = np.fromiter((s.t for s in chunk), np.int64, len(chunk))
                inputs = (ring.read(slots, t - n_in, n_in) if ring is not None and n_in
                          else np.zeros((len(chunk), 0, spec.row), np.uint8))
                frames.append(snapshot_frame(spec, [s.id for s in chunk], [s.owner for s in chunk], t, n_in,
                                             n_out, inputs, window.spikes.read(slots, t - n_out, n_out),
                                             window.scores.read(slots, t - n_out, n_out), r.score_sums(slots)))
        return frames

    def recover(self) -> dict[str, Any]:
        """Rebuild every live session of the log (before the engine turns ready); the rest are lost.

        A log this code cannot read (a bug, records of another version, or damaged before its end) must not
        keep the engine core from starting, or the supervisor would restart it forever: it is kept aside for
        a person to look at, its sessions answer 410 session_lost, and the engine starts empty."""
        if self.cluster is not None:  # sessions are claimed one by one when first asked for (adopt)
            self.sessions.tag = self.cluster.shared_tag(self.sessions.tag)
            return {}
        if self.log is None:
            return {}
        data = self.log.store.load()
        try:
            return self._recover(data)
        except Exception as e:
            where = self.log.store.keep_aside(data)
            after = (f"the log was kept aside at {where} and the engine core starts without its sessions (their ids "
                     "answer 410 session_lost)")
            if isinstance(e, CorruptLog):  # damaged, not a bug: one line (its sessions may be older than their answers)
                log.error("%s, so none of its sessions can be trusted; %s", e, after)
            else:
                log.exception("session log: recovery failed; %s", after)
            for s in list(self.sessions.live.values()):
                self.sessions.close(s, "session_lost")
            self.log.pending = []
            self.compact()
            self.recovery = {"sessions": 0, "lost": -1, "failed": True, "kept_aside": where}
            return self.recovery

    def _recover(self, data: bytes) -> dict[str, Any]:
        assert self.log is not None
        t_start = time.perf_counter()
        st = read_log(data, self.log.specs)
        t_read = time.perf_counter()
        if st.tag:
            self.sessions.tag = st.tag  # ids issued before the restart stay ids of this store
        for sid, (reason, owner) in st.gone.items():
            self.sessions.remember(sid, reason, owner)
        todo: list[tuple[str, Recovered]] = []
        lost: list[tuple[str, str]] = []
        for sid, rec in st.live.items():
            why = self._unrebuildable(rec, st.fingerprints)
            if why:
                lost.append((sid, why))
            else:
                todo.append((sid, rec))
        rebuilt = self._rebuild_all(todo, lost)
        for sid, why in lost:
            self.sessions.remember(sid, "session_lost", st.live[sid].owner if sid in st.live else "")
            log.warning("session lost id=%s: %s", sid[:8], why)
        t_replay = time.perf_counter()
        try:
            self.compact()
        except Exception as e:  # a full disk: the log just read still holds every session; rewritten once it can be
            if not store_error(e):
                raise
            self._log_stale, self._log_retry_at = True, self.clock() + 1.0
            self.metrics.log_stale.set(1)
            self._store_failed("session log: rewriting the log after the recovery failed", "a restart")
        t_end = time.perf_counter()
        stats = {"sessions": rebuilt, "lost": len(lost), "log_bytes": len(data), "records": st.records,
                 "seconds": round(t_end - t_start, 3), "read_s": round(t_read - t_start, 3),
                 "replay_s": round(t_replay - t_read, 3), "compact_s": round(t_end - t_replay, 3)}
        log.info("recovered %d sessions (%d lost) from %d log records (%d bytes) in %.3f s", rebuilt, len(lost),
                 st.records, len(data), stats["seconds"])
        self.recovery = stats
        return stats

    def _unrebuildable(self, rec: Recovered, fingerprints: dict[str, str]) -> str:
        """Why a logged session cannot be rebuilt here ('' if it can)."""
        spec = self.specs.get(rec.model)
        if spec is None:
            return f"model {rec.model!r} is not served any more"
        if fingerprints.get(rec.model) != spec.fingerprint:
            return (f"model {rec.model!r} changed (weights, dtype or backend): {spec.fingerprint} now, "
                    f"{fingerprints.get(rec.model)} in the log")
        if spec.replay is None:
            return f"model {rec.model!r} keeps state no finite input history rebuilds (LIF)"
        if rec.t < 0 or rec.n_inputs < min(rec.t, spec.replay):
            return "its records in the log are incomplete"
        return ""

    # ----- sessions shared by replicas (service/core/cluster.py) ----------------------------------
    def _cluster_header(self, model: str) -> bytes:
        return frame([HEADER, {"tag": self.sessions.tag, "models": {model: self.specs[model].fingerprint}}])

    def _answering(self, sid: str, front: bytes, rid: int) -> None:
        """This turn answers ``rid`` about ``sid``: refused instead if the session's records are refused."""
        if self.cluster is not None:
            self._answered.setdefault(sid, []).append((front, rid))

    def _cluster_steps(self, name: str, L: int, items: list[Item], inputs: bytes, slots: np.ndarray,
                       t0: np.ndarray, spikes: np.ndarray, scores: np.ndarray) -> None:
        """One steps record per session, each to its own log."""
        assert self.cluster is not None
        spec = self.specs[name]
        ring = self.input_rings.get(name)
        rows = np.frombuffer(inputs, np.uint8).reshape(len(items), L, -1)
        if ring is not None:
            ring.write(slots, t0, rows)
        sums = self.runners[name].score_sums(slots)
        limit = self.settings.cluster_session_records
        for b, it in enumerate(items):
            sid = it.req.session.id
            self._answering(sid, it.req.front, it.req.rid)
            self.cluster.add("a", sid, frame_parts([STEPS, name, L, [sid], t0[b:b + 1].tobytes()], rows[b],
                                                   spikes[b], scores[b], sums[b]), it.req.session.owner)
            n = self._records[sid] = self._records.get(sid, 0) + 1
            if n >= limit and spec.replay is not None:
                self._records[sid] = -1  # rewritten at the end of this turn

    def _cluster_end(self, s: Session, reason: str) -> None:
        assert self.cluster is not None
        self._records.pop(s.id, None)
        if reason != "session_moved":
            self.cluster.add("e", s.id, frame([END, [s.id], [reason]]))

    def flush_cluster(self) -> None:
        """Write this turn's records, fenced by each session's lease; refuse what another replica took over;
        rewrite long session logs as one snapshot."""
        assert self.cluster is not None
        answered, self._answered = self._answered, {}
        try:
            wrote = bool(self.cluster.ops)
            refused = self.cluster.flush()
            if wrote:  # a turn with nothing to write says nothing of Redis
                self._log_failures = 0
        except Exception:
            self._store_failed("cluster: writing to Redis failed", "a replica's death")
            self.cluster.ops = []
            return
        for sid in refused:
            self.moved(sid, answered.get(sid, []))
        due = [sid for sid, n in self._records.items() if n < 0]
        for sid in due:
            s = self.sessions.live.get(sid)
            if s is None:
                self._records.pop(sid, None)
                continue
            self._records[sid] = 0
            self.cluster.add("r", sid, self._cluster_header(s.model) + b"".join(self._snapshots(s.model, [s])), s.owner)

    def moved(self, sid: str, answered: list[tuple[bytes, int]]) -> None:
        """Another replica claimed ``sid``: this turn's answers about it become session_moved, and it goes."""
        err = self.sessions.gone_error(sid, "session_moved")
        for front, rid in answered:
            for item in self.outbox.get(front, []):
                if item[0] == rid:
                    item[:] = error_answer(rid, err)
        s = self.sessions.live.get(sid)
        if s is not None:
            self.metrics.sessions_moved.labels(s.model).inc()
            log.info("session moved id=%s model=%s: another replica claimed it", sid[:8], s.model)
            self.sessions.close(s, "session_moved")

    def adopt(self, sid: str, owner: str = "") -> Session:
        """Claim ``sid`` from the shared store and rebuild it here (another replica served it, or died); another
        ``owner``'s session is not claimed: answered as one that does not exist."""
        self.check_open()
        assert self.cluster is not None
        errors = self._adopt([sid], [self.cluster.claim(sid, owner)], [owner])
        if sid in errors:
            raise errors[sid]
        return self.sessions.live[sid]

    def adopt_pending(self) -> None:
        """The step requests of this turn for sessions held nowhere here: claimed together (one Redis round
        trip), replayed in batches, then handled as if they had just arrived (a failover brings many). Each is
        ``[rid, op, sid, ...]`` ("steps" or "sequence")."""
        assert self.cluster is not None
        pending, self._adopting = self._adopting, []
        # one claim per session and asking owner (the last item of each request): only the session's own
        # owner's is granted; the requests of other owners are answered 404, however the adoption went
        asked = list(dict.fromkeys((req[2], req[-1]) for _, _, req in pending if req[2] not in self.sessions.live))
        claimed: dict[str, bytes | None] = {}
        refused: set[tuple[str, str]] = set()
        errors: dict[str, ServiceError] = {}
        if asked and not self.closing:
            sids, owners = [sid for sid, _ in asked], [owner for _, owner in asked]
            try:
                got = self.cluster.claim_many(sids, owners)
            except StoreUnavailable as e:  # Redis gone: 503 for these requests, as for a read's claim; goes on
                cause = e.__cause__ or e
                log.error("cluster: claiming %d session(s) from Redis failed: %s: %s", len(sids), type(cause).__name__,
                          cause)
                errors = {sid: StoreUnavailable.claiming(sid, cause) for sid in sids}
            except Exception as e:  # a bug: 500 for these requests, the engine core goes on
                log.exception("cluster: claiming %d session(s) failed", len(sids))
                errors = {sid: internal(e) for sid in sids}
            else:
                for sid, owner, data in zip(sids, owners, got, strict=True):
                    if data is None:
                        refused.add((sid, owner))
                    if data is not None or sid not in claimed:
                        claimed[sid] = data
        if claimed:
            errors = self._adopt(list(claimed), list(claimed.values()))
        for front, rid, req in pending:
            err = errors.get(req[2])
            if (req[2], req[-1]) in refused and claimed.get(req[2]) is not None:  # another owner's: whether it
                # ended, was lost or found no slot here is not this request's to know
                err = self.sessions.not_found(req[2])
            elif req[2] in claimed and claimed[req[2]] is None:  # no records (or not this owner's): what this
                err = self.sessions.gone_error(req[2], owner=req[-1])  # replica remembers, told to its owner only
            if err is not None:
                self.answer(front, error_answer(rid, err))
            else:
                self.handle(front, req)  # live now (or, with closing set, answered shutting_down)

    def _adopt(self, sids: list[str], claimed: list[bytes | None],
               owners: list[str] | None = None) -> dict[str, ServiceError]:
        """Rebuild the claimed sessions (their logs in ``claimed``); what went wrong for each that failed (for one
        without records, as told to the asking owner in ``owners``, "" by default)."""
        assert self.cluster is not None
        t0 = time.perf_counter()
        errors: dict[str, ServiceError] = {}
        todo: list[tuple[str, Recovered]] = []
        records: dict[str, int] = {}
        lost: list[tuple[str, str]] = []
        free = {name: pool.size - pool.in_use for name, pool in self.sessions.pools.items()}
        for sid, data, owner in zip(sids, claimed, owners or [""] * len(sids), strict=True):
            if data is None:
                errors[sid] = self.sessions.gone_error(sid, owner=owner)
                continue
            try:
                st = read_log(data, self.specs)
            except CorruptLog as e:
                lost.append((sid, str(e)))
                continue
            rec = st.live.get(sid)
            if rec is None:
                self.cluster.forget(sid)
                errors[sid] = self.sessions.gone_error(sid, st.gone.get(sid, ("session_lost", ""))[0])
                continue
            why = self._unrebuildable(rec, st.fingerprints)
            if why:
                lost.append((sid, why))
                continue
            if free.get(rec.model, 0) <= 0:
                self.cluster.forget(sid)  # the lease stays with us until another replica claims it
                errors[sid] = TooManySessions(
                    f"model {rec.model!r}: all session slots of this replica are in use; session {sid!r} cannot be "
                    "taken over here now", retry_after=1)
                continue
            free[rec.model] -= 1
            records[sid] = st.records
            todo.append((sid, rec))
        self._rebuild_all(todo, lost)
        for sid, why in lost:
            log.warning("session lost id=%s: %s", sid[:8], why)
            self.cluster.add("e", sid, frame([END, [sid], ["session_lost"]]))
            errors[sid] = self.sessions.gone_error(sid, "session_lost")
        taken = 0
        for sid, rec in todo:
            if sid in self.sessions.live:
                self._records[sid] = records[sid]
                self.metrics.sessions_adopted.labels(rec.model).inc()
                taken += 1
        if taken:
            log.info("took over %d session(s) from the shared store in %.1f ms", taken,
                     (time.perf_counter() - t0) * 1000)
        return errors

    def _rebuild_all(self, todo: list[tuple[str, Recovered]], lost: list[tuple[str, str]]) -> int:
        """Rebuild logged sessions (recovery, takeover), batched by model and replay length; how many were."""
        groups: dict[tuple[str, int], list[tuple[str, Recovered]]] = {}
        for sid, rec in todo:
            groups.setdefault((rec.model, min(rec.t, self.specs[rec.model].replay or 0)), []).append((sid, rec))
        size = max(self.settings.max_batch_size, 1024)  # larger products than serving uses: fewer calls
        return sum(self._rebuild(model, n, members[i:i + size], lost)
                   for (model, n), members in groups.items() for i in range(0, len(members), size))

    def _rebuild(self, model: str, n: int, members: list[tuple[str, Recovered]], lost: list[tuple[str, str]]) -> int:
        """Open ``members`` again and replay their last ``n`` inputs in one batch."""
        spec, r = self.specs[model], self.runners[model]
        back: list[tuple[Session, Recovered]] = []
        for sid, rec in members:
            try:
                s = self.sessions.open(model, sid, rec.owner)
            except TooManySessions:
                lost.append((sid, f"no free session slot of model {model!r} (PSN_MAX_SESSIONS is lower than before)"))
                continue
            s.t = rec.t
            back.append((s, rec))
        if not back:
            return 0
        slots = np.fromiter((s.slot for s, _ in back), np.int64, len(back))
        t = np.fromiter((s.t for s, _ in back), np.int64, len(back))
        payloads = [rec.last_inputs(n, spec.row) for _, rec in back]
        zeros = bytes(spec.classes * spec.sums.itemsize)
        sums = np.frombuffer(b"".join(rec.sums or zeros for _, rec in back), spec.sums).reshape(len(back), -1)
        r.rebuild(slots, t - n, payloads, n, sums.copy())
        ring = self.input_rings.get(model)
        if ring is not None and n:
            ring.write(slots, t - n, np.frombuffer(b"".join(payloads), np.uint8).reshape(len(back), n, spec.row))
        window = self.windows[model]
        for s, rec in back:
            m = min(rec.n_outputs, spec.window, s.t)
            if m:
                sp, sc = rec.last_outputs(m, spec.spike_bytes, spec.classes * spec.wire.itemsize)
                window.write(np.array([s.slot]), np.array([s.t - m]),
                             np.frombuffer(sp, np.uint8).reshape(1, m, -1),
                             np.frombuffer(sc, spec.wire).reshape(1, m, -1))
        return len(back)

    def run_classify(self, name: str) -> None:
        queue, r = self.classify_queue[name], self.runners[name]
        take, self.classify_queue[name] = queue[:self.settings.max_batch_size], queue[self.settings.max_batch_size:]
        by_T: dict[int, list[ClassifyRequest]] = {}
        now = self.clock()
        for c in take:
            if now - c.arrived > self.timeout_s:
                self.answer(c.front, error_answer(c.rid, self.timed_out(now - c.arrived)))
            else:
                by_T.setdefault(c.T, []).append(c)
        for T, reqs in by_T.items():
            try:
                spikes, scores = r.classify([c.payload for c in reqs], T)
            except Exception as e:
                log.exception("engine: classify of model %r failed", name)
                for c in reqs:
                    self.answer(c.front, error_answer(c.rid, internal(e)))
                continue
            for b, c in enumerate(reqs):
                self.answer(c.front, [c.rid, OK, [spikes[b].tobytes(), scores[b].tobytes()]])

    # ----- time and life cycle -----------------------------------------------------------------
    def wait_s(self) -> float | None:
        """Seconds until some batch is due (0: now), None when nothing is pending."""
        if any(self.classify_queue.values()):
            return 0.0
        now = self.clock()
        waits = [w for sched in self.schedulers.values() if (w := sched.wait_s(now)) is not None]
        if not waits:
            return None
        return 0.0 if self.closing else min(waits)

    def has_work(self) -> bool:
        return any(s.pending for s in self.schedulers.values()) or any(self.classify_queue.values())

    def reap(self) -> list[Session]:
        """Expire idle sessions; tell the front ends that watch them."""
        expired = self.sessions.expire_idle()
        for s in expired:
            self.metrics.sessions_expired.labels(s.model).inc()
            log.info("session expired id=%s model=%s", s.id[:8], s.model)
            for front in s.watchers:
                self.answer(front, [EVENT, "expired", s.id])
        return expired

    def begin_drain(self) -> None:
        """Refuse new work; what is queued still runs (``step`` no longer waits for fuller batches)."""
        self.closing, self.ready = True, False

    def refuse_pending(self) -> None:
        """Drain timed out: answer everything still queued with shutting_down."""
        err = ShuttingDown("the service shut down before this request ran", retry_after=1)
        for name, sched in self.schedulers.items():
            for s in list(sched.ready):
                for req in sched.drop(s):
                    self.answer(req.front, error_answer(req.rid, err))
            for c in self.classify_queue[name]:
                self.answer(c.front, error_answer(c.rid, err))
            self.classify_queue[name] = []

    def warmup(self) -> None:
        for r in self.runners.values():
            t0 = time.perf_counter()
            r.warmup()
            log.info("warmed up model=%s in %.3f s", r.name, time.perf_counter() - t0)

    def update_gauges(self) -> None:
        for name, sched in self.schedulers.items():
            self.metrics.sessions.labels(name).set(self.sessions.count(name))
            self.metrics.queue_depth.labels(name).set(sched.pending + len(self.classify_queue[name]))

