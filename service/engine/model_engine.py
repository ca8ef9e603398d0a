"""One model's engine: its backend, its batcher, and the step/classify logic over sessions.

Everything that can be refused is checked before any state is touched; a session's state changes
only when its batch has run (``_applied`` runs on the loop, even if the waiting client has gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

import torch

from service.backends.base import Backend
from service.encode import score_format, step_tails, with_index
from service.engine.batcher import Batcher, WorkItem
from service.engine.sessions import Session, StepOut
from service.errors import InvalidInput, ModelCannotStream, PastHorizon, QueueFull, RetryTooOld, SessionGone, StepGap
from service.metrics import Metrics


class ModelEngine:
    def __init__(self, backend: Backend, executor: Executor, metrics: Metrics, *, max_batch_size: int,
                 max_wait_s: float, queue_depth: int):
        self.backend, self.executor, self.metrics = backend, executor, metrics
        self.model = backend.model
        self.name = self.model.name
        self.cfg = self.model.cfg
        self.labels = self.model.class_names
        self._labels_json = [json.dumps(label) for label in self.labels]
        self._score_fmt = score_format(self.cfg.num_classes, backend.dtype)
        self.queue_depth = queue_depth
        self._horizon = self.cfg.T if self.cfg.neuron == "masked" else None  # steps a session may take
        self.classify_in_flight = 0
        # labelled metric children, looked up once (a labels() call costs microseconds per step)
        self._m_steps = metrics.steps.labels(self.name)
        self._m_latency = metrics.step_latency.labels(self.name)
        self._m_batch = metrics.batch_size.labels(self.name)
        self._m_batch_s = metrics.batch_seconds.labels(self.name)
        self.batcher = Batcher(self.name, self._execute, executor, max_batch_size=max_batch_size,
                               max_wait_s=max_wait_s, queue_depth=queue_depth, observe=self._observe)

    @property
    def streams(self) -> bool:
        return self.cfg.streams and self.backend.max_slots > 0

    def check_streams(self) -> None:
        if not self.streams:
            raise ModelCannotStream(f"model {self.name!r} ({self.cfg.neuron} neurons) cannot stream: each output "
                                    "step reads the whole sequence; use POST /v1/classify", field="model")

    # ----- engine thread -------------------------------------------------------------------
    def _execute(self, batch: Sequence[WorkItem]) -> list[list[StepOut]]:
        """Engine thread: run the batch (one backend call per distinct L), return JSON-ready outputs."""
        by_len: dict[int, list[int]] = {}
        for i, item in enumerate(batch):
            by_len.setdefault(item.x.shape[0], []).append(i)
        results: list[Any] = [None] * len(batch)
        for idx in by_len.values():
            x = torch.stack([batch[i].x for i in idx], dim=1)  # (L, B, *input_shape)
            slots = torch.tensor([batch[i].slot for i in idx], dtype=torch.long)
            spikes, scores = self.backend.run(x, slots)
            tails = step_tails(spikes, scores, self._labels_json, self._score_fmt)  # [L][B]
            for j, i in enumerate(idx):
                results[i] = [step[j] for step in tails]
        return results

    def _observe(self, n: int, seconds: float) -> None:
        self._m_batch.observe(n)
        self._m_batch_s.observe(seconds)

    # ----- event loop ----------------------------------------------------------------------
    async def reset_slot(self, slot: int) -> None:
        await asyncio.get_running_loop().run_in_executor(self.executor, self.backend.reset,
                                                         torch.tensor([slot], dtype=torch.long))

    async def step(self, session: Session, x: torch.Tensor, start: int | None) -> tuple[int, list[StepOut], int]:
        """Apply ``x`` (L, *input_shape) to ``session`` from step ``start`` (None: the next step).

        Returns ``(start, outputs, replayed)``: one output (JSON text) per step of the request, of which
        the first ``replayed`` were already applied and are answered from the session's recent outputs.
        """
        async with session.lock:
            if session.pending is not None and not session.pending.done():  # a cancelled request's batch
                with contextlib.suppress(Exception):
                    await asyncio.shield(session.pending)
            if session.slot < 0:
                raise SessionGone(f"session {session.id!r} is no longer open", field="session_id",
                                  code="session_closed")
            t, L = session.t, x.shape[0]
            start = t if start is None else start
            if start > t:
                raise StepGap(f"start: session {session.id!r} has applied {t} steps, so the next step is {t}; "
                              f"got start={start} (steps {t}..{start - 1} are missing)", field="start")
            replayed = min(t - start, L)
            cached: list[StepOut] = []
            if replayed:
                first_kept = t - len(session.recent)
                if start < first_kept:
                    raise RetryTooOld(f"start: steps before {first_kept} are no longer kept (the last "
                                      f"{len(session.recent)} are); cannot answer a retry from {start}", field="start")
                recent = list(session.recent)
                cached = recent[start - first_kept:start - first_kept + replayed]
            n_new = L - replayed
            if self._horizon is not None and t + n_new > self._horizon:
                raise PastHorizon(f"steps: model {self.name!r} has a fixed horizon of T={self._horizon} steps; the "
                                  f"session is at step {t}, so at most {self._horizon - t} more fit, got {n_new}",
                                  field="steps")
            session.last_used = time.monotonic()
            if n_new == 0:
                return start, cached, replayed
            new = x[replayed:] if replayed else x

            def applied(tails: list[str]) -> None:  # on the loop, right after the batch ran
                base = session.t
                outs = [with_index(base + i, tail) for i, tail in enumerate(tails)]
                session.recent.extend(outs)
                session.t = base + len(outs)
                session.last_used = time.monotonic()
                self._m_steps.inc(len(outs))
                done.append(outs)

            done: list[list[str]] = []

            t0 = time.perf_counter()
            fut = self.batcher.submit(session.slot, new, applied)
            session.pending = fut
            await fut
            self._m_latency.observe(time.perf_counter() - t0)
            return start, cached + done[0], replayed

    async def classify(self, x: torch.Tensor) -> list[StepOut]:
        """Parallel form over one sequence ``x`` (T, *input_shape); no session state is touched."""
        T = x.shape[0]
        if self.cfg.neuron == "psn" and T != self.cfg.T:
            raise InvalidInput(f"steps: model {self.name!r} (plain PSN) needs exactly T={self.cfg.T} steps, got {T}",
                               field="steps")
        if self.cfg.neuron == "masked" and T > self.cfg.T:  # type: ignore[operator]
            raise PastHorizon(f"steps: model {self.name!r} has a fixed horizon of T={self.cfg.T} steps, got {T}",
                              field="steps")
        if self.classify_in_flight >= self.queue_depth:
            raise QueueFull(f"model {self.name!r}: {self.queue_depth} classify requests in flight; retry shortly",
                            retry_after=1)
        self.classify_in_flight += 1
        try:
            def run() -> list[StepOut]:
                spikes, scores = self.backend.classify(x.unsqueeze(1))
                tails = step_tails(spikes, scores, self._labels_json, self._score_fmt)  # [T][1]
                return [with_index(i, step[0]) for i, step in enumerate(tails)]
            return await asyncio.get_running_loop().run_in_executor(self.executor, run)
        finally:
            self.classify_in_flight -= 1
