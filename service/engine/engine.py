"""The engine of a service: a ``ModelEngine`` per model, the session table, one engine thread per
device, the idle reaper, and the start/drain life cycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import Executor, ThreadPoolExecutor

import torch

from model.folder import LoadedModel
from service.backends import get_backend_class
from service.config import Settings
from service.engine.inline import InlineExecutor
from service.engine.model_engine import ModelEngine
from service.engine.sessions import Session, SessionTable
from service.errors import ModelNotFound, ShuttingDown
from service.metrics import Metrics

log = logging.getLogger("psn.engine")


class Engine:
    def __init__(self, models: list[LoadedModel], settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        backend_cls = get_backend_class(settings.backend)
        self.device = settings.torch_device
        self.threaded = settings.engine_thread == "on" or (settings.engine_thread == "auto" and
                                                          self.device.type != "cpu")
        # One engine thread per device. On the CPU the model holds the GIL for most of a batch, so the
        # thread mostly adds hand-over cost (measured on 2 cores: half the throughput at max_batch_size=1,
        # 30-50 us more CPU per step at 64 WS sessions; see BENCHMARKS.md). "auto" runs CPU batches
        # inline on the event loop (each takes 0.1-3 ms) and GPU batches in the engine thread.
        self.executor: Executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"psn-engine-{self.device.type}")
            if self.threaded else InlineExecutor())
        self.sessions = SessionTable(settings.idle_timeout_s, settings.retry_window, settings.remember_gone)
        self.models: dict[str, ModelEngine] = {}
        for m in models:
            me = ModelEngine(backend_cls(m, settings.max_sessions, settings), self.executor, metrics,
                             max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000,
                             queue_depth=settings.queue_depth)
            self.models[m.name] = me
            self.sessions.add_model(m.name, me.backend.max_slots)
        self.ready = False
        self.closing = False
        self._reaper: asyncio.Task | None = None

    def model(self, name: str) -> ModelEngine:
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFound(f"model: no model named {name!r}; available: {sorted(self.models)}",
                                field="model") from None

    # ----- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.settings.warmup:
            await loop.run_in_executor(self.executor, self._warmup)
        for me in self.models.values():
            me.batcher.start()
        self._reaper = loop.create_task(self._reap(), name="session-reaper")
        self.ready = True

    def _warmup(self) -> None:
        for me in self.models.values():
            t0 = time.perf_counter()
            cfg = me.cfg
            T = cfg.T if cfg.T is not None else 4
            me.backend.classify(torch.zeros(T, 1, *cfg.input_shape, dtype=me.backend.dtype))
            if me.streams:
                slots = torch.zeros(1, dtype=torch.long)
                for L in (1, 2):
                    me.backend.run(torch.zeros(L, 1, *cfg.input_shape, dtype=me.backend.dtype), slots)
                me.backend.reset(slots)
            log.info("warmed up model=%s in %.3f s", me.name, time.perf_counter() - t0)

    async def drain(self) -> None:
        """Refuse new work, finish what is queued (up to drain_timeout_s), stop the engine thread."""
        self.closing, self.ready = True, False
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(me.batcher.drain(self.settings.drain_timeout_s) for me in self.models.values()))
        self.executor.shutdown(wait=True, cancel_futures=True)
        log.info("engine drained")

    async def _reap(self) -> None:
        period = min(1.0, self.settings.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            for s in self.sessions.expire_idle():
                self.metrics.sessions_expired.labels(s.model).inc()
                log.info("session expired id=%s model=%s", s.id[:8], s.model)
            self.update_gauges()

    def update_gauges(self) -> None:
        for name, me in self.models.items():
            self.metrics.sessions.labels(name).set(self.sessions.count(name))
            self.metrics.queue_depth.labels(name).set(me.batcher.depth)

    # ----- sessions ------------------------------------------------------------------------
    def check_open(self) -> None:
        if self.closing:
            raise ShuttingDown("the service is shutting down; retry on another replica", retry_after=1)

    async def open_session(self, model: str) -> Session:
        self.check_open()
        me = self.model(model)
        me.check_streams()
        s = self.sessions.open(model)
        try:
            await me.reset_slot(s.slot)
        except BaseException:
            self.sessions.close(s)
            raise
        s.last_used = time.monotonic()
        self.metrics.sessions_opened.labels(model).inc()
        self.metrics.sessions.labels(model).set(self.sessions.count(model))
        return s

    async def close_session(self, s: Session) -> None:
        async with s.lock:  # after the request in flight, if any
            self.sessions.close(s)
        self.metrics.sessions.labels(s.model).set(self.sessions.count(s.model))
