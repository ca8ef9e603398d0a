"""Prometheus metrics, one registry per app (tests run several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions = Gauge("psn_sessions", "Open sessions", ["model"], registry=r)
        self.queue_depth = Gauge("psn_queue_depth", "Requests waiting for a batch", ["model"], registry=r)
        self.batch_size = Histogram("psn_batch_size", "Sessions per engine batch", ["model"], buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("psn_batch_seconds", "Engine time per batch", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.step_latency = Histogram("psn_step_latency_seconds", "Queue + compute time of a streaming request",
                                      ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.steps = Counter("psn_steps", "Session steps computed", ["model"], registry=r)
        self.sessions_opened = Counter("psn_sessions_opened", "Sessions opened", ["model"], registry=r)
        self.sessions_expired = Counter("psn_sessions_expired", "Sessions closed by the idle timeout", ["model"],
                                        registry=r)
        self.errors = Counter("psn_errors", "Refused requests by error code", ["code"], registry=r)
