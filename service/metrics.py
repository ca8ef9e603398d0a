"""Prometheus metrics. The engine core owns the engine's (one registry, served through every front
end's /metrics); the front ends add theirs, summed over all workers."""

from __future__ import annotations

import glob
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class EngineMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions = Gauge("psn_sessions", "Open sessions", ["model"], registry=r)
        self.queue_depth = Gauge("psn_queue_depth", "Requests waiting for a batch", ["model"], registry=r)
        self.batch_size = Histogram("psn_batch_size", "Sessions per engine batch", ["model"], buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("psn_batch_seconds", "Engine time per batch", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.steps = Counter("psn_steps", "Session steps computed", ["model"], registry=r)
        self.sessions_opened = Counter("psn_sessions_opened", "Sessions opened", ["model"], registry=r)
        self.sessions_adopted = Counter("psn_sessions_adopted", "Sessions taken over from another replica (cluster)",
                                        ["model"], registry=r)
        self.sessions_moved = Counter("psn_sessions_moved", "Sessions another replica took over (cluster)", ["model"],
                                      registry=r)
        self.sessions_expired = Counter("psn_sessions_expired", "Sessions closed by the idle timeout", ["model"],
                                        registry=r)
        self.log_stale = Gauge("psn_session_log_stale", "1 while the session store fails: steps answered meanwhile "
                               "are not in the log, and a restart would lose them", registry=r)


class SharedFolderCollector(MultiProcessCollector):
    """prometheus_client's collector over the front ends' shared folder, less the files of a front end that
    is starting this very moment: prometheus_client creates a process's file, then sizes it; read in between
    (0 bytes) it raised struct.error, and the scrape that landed then was answered 500."""

    def collect(self):  # type: ignore[no-untyped-def]
        files = [f for f in glob.glob(os.path.join(self._path, "*.db")) if _size(f) > 0]
        return self.merge(files, accumulate=True)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:  # a dead front end's live gauge file, removed since the glob
        return 0


class FrontendMetrics:
    """Front-end metrics. Under the supervisor, ``PROMETHEUS_MULTIPROC_DIR`` is set for the front ends
    (prometheus_client's multiprocess mode): every worker's /metrics then reports the sum over all
    workers, so a scrape that lands on any worker sees the whole service."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.errors = Counter("psn_errors", "Refused requests by error code", ["code"], registry=r)
        self._latency = Histogram("psn_step_latency_seconds", "Front end to engine core and back, per streaming "
                                  "request", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.connections = Gauge("psn_ws_connections", "Open WebSocket connections", registry=r,
                                 multiprocess_mode="livesum")
        self._latency_children: dict[str, Histogram] = {}

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def latency(self, model: str) -> Histogram:
        h = self._latency_children.get(model)
        if h is None:
            h = self._latency_children[model] = self._latency.labels(model)
        return h

    def text(self) -> str:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            SharedFolderCollector(registry)
            return generate_latest(registry).decode()
        return generate_latest(self.registry).decode()
