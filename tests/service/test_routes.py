"""The front end's HTTP routes (the real app of ``create_app``, every middleware included) driven in process
through httpx's ASGI transport, with test_frontend_state's fake engine core in place of the engine client:
what each route answers while the engine core is away (the supervisor restarts a real one too quickly to
catch that state through the real server), /healthz's fields, and the replica label on /metrics
(``with_label``, read back with prometheus_client's own parser)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.frontend.app import create_app
from service.frontend.client import EngineUnavailable
from service.frontend.routes.health import with_label
from service.frontend.state import Frontend
from service.metrics import EngineMetrics, FrontendMetrics
from tests.service.test_frontend_state import MODEL, FakeEngine

ENGINE_PID = 4321
INFO = {**MODEL, "neuron": "sliding", "streams": True, "k": 2, "horizon": None, "dataset": "random", "config": {},
        "max_input": 1e30,
        "metrics": {"test_acc": 0.5, "history": [{"epoch": 1}], "augment": {"shift": 2}}}  # what a hello says of it


class Engine(FakeEngine):
    """The fake engine core, plus what the engine client does when it is not connected: a call is refused at
    once (``EngineClient.call``), ``ping`` says not ready, and ``hello`` stays the last engine core's."""

    def __init__(self) -> None:
        super().__init__()
        self.hello = {"engine": {"pid": ENGINE_PID}}
        self.metrics = EngineMetrics()

    def call(self, method: str, *args: Any) -> asyncio.Future:
        if not self.connected:
            raise EngineUnavailable("the engine core is not available (starting or restarting); retry shortly",
                                    retry_after=1)
        fut = super().call(method, *args)
        if method == "metrics":  # what EngineCore.metrics_text answers
            fut.set_result(generate_latest(self.metrics.registry).decode())
        return fut

    async def ping(self, timeout: float) -> bool:
        return self.connected

    async def readiness(self, timeout: float) -> dict | None:
        return {"ready": True, "session_store": None} if self.connected else None


def app_client(**settings: Any) -> tuple[httpx.AsyncClient, Engine]:
    """The app with the state its lifespan sets up, over the fake engine core (connected, one model "m")."""
    s = Settings(**settings)
    app = create_app(s, "unix:/nonexistent/engine.sock")
    engine = Engine()
    app.state.frontend = Frontend(s, engine, app.state.metrics, 0)
    engine.on_hello({"models": [INFO]})
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost"), engine


STEPS = {"steps": [[0.5, 1.0]]}
ROUTES = [("GET", "/v1/models", None), ("GET", "/v1/models/m", None), ("POST", "/v1/sessions", {"model": "m"}),
          ("GET", "/v1/sessions/s1", None), ("DELETE", "/v1/sessions/s1", None),
          ("POST", "/v1/sessions/s1/steps", STEPS), ("POST", "/v1/classify", {"model": "m", **STEPS})]


def test_while_the_engine_core_is_away_every_route_answers_not_ready() -> None:
    """Each route checks first: 503 ``not_ready`` with Retry-After, not a stale answer (the model list the
    last hello gave) nor another route's error; the probes say so too."""
    async def run() -> None:
        client, engine = app_client()
        engine.sessions[("", "s1")] = "m"
        async with client:
            assert (await client.get("/readyz")).status_code == 200
            models = (await client.get("/v1/models")).json()["models"]
            assert [(m["name"], m["metrics"]) for m in models] == [("m", {"test_acc": 0.5})]  # scalars only
            engine.connected = False  # the engine core died; the supervisor is starting another
            for method, path, body in ROUTES:
                r = await client.request(method, path, json=body)
                assert r.status_code == 503 and r.headers["retry-after"] == "1", (method, path, r.text)
                assert r.json()["error"]["code"] == "not_ready", (method, path, r.text)
            r = await client.get("/readyz")
            assert r.status_code == 503 and r.json()["status"] == "not_ready"
            assert (await client.get("/healthz")).status_code == 200
        assert engine.calls == []  # none of them reached the engine core

    asyncio.run(run())


def test_healthz_names_the_engine_core_only_while_connected_and_the_replica_only_in_a_cluster() -> None:
    async def run() -> None:
        for settings, replica in (({}, None), ({"cluster": True, "replica_id": "r1"}, "r1")):
            client, engine = app_client(**settings)
            async with client:
                h = (await client.get("/healthz")).json()
                assert (h["status"], h["engine_pid"], h["replica"], h["worker"]) == ("ok", ENGINE_PID, replica, 0)
                engine.connected = False  # its hello is the dead engine core's: no pid to name
                h = (await client.get("/healthz")).json()
                assert (h["engine_pid"], h["replica"]) == (None, replica)

    asyncio.run(run())


def exposition() -> str:
    """A real scrape: the engine core's and a front end's metrics with samples of every kind."""
    engine, front = EngineMetrics(), FrontendMetrics()
    engine.sessions.labels("m").set(3)
    engine.batch_size.labels("m").observe(5)
    engine.steps.labels("m").inc(7)
    front.error("not_found")
    front.connections.set(2)  # no labels of its own
    return generate_latest(engine.registry).decode() + generate_latest(front.registry).decode()


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


@pytest.mark.parametrize("text", [exposition(), "# HELP x a gauge\n# TYPE x gauge\nx{} 1.0\nx 2.0\n"],
                         ids=["scrape", "empty braces"])
@pytest.mark.parametrize("replica", ["r-1", 'pod "7" \\ a\nb'])  # PSN_REPLICA_ID is any string
def test_with_label_adds_the_replica_to_every_sample_and_nothing_else(text: str, replica: str) -> None:
    out = with_label(text, "replica", replica)
    assert samples(out) == [(name, {"replica": replica, **labels}, value) for name, labels, value in samples(text)]
    assert [line for line in out.splitlines() if line.startswith("#")] == \
        [line for line in text.splitlines() if line.startswith("#")]
    assert out.endswith("\n")  # the text format: the last line ends with a line feed too


def test_metrics_of_a_replica_carry_its_label_and_the_engine_cores_samples() -> None:
    async def run() -> None:
        client, engine = app_client(cluster=True, replica_id="r1")
        engine.metrics.steps.labels("m").inc(4)
        async with client:
            r = await client.get("/metrics")
        got = samples(r.text)
        assert ("psn_steps_total", {"replica": "r1", "model": "m"}, 4.0) in got
        assert got and all(labels["replica"] == "r1" for _, labels, _ in got)

    asyncio.run(run())
