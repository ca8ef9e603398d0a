"""The front end's app factory and lifespan: connect to the engine core, serve HTTP and WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service import demo
from service.config import Settings
from service.frontend.auth import AccessControl, KeyConnectionLimit, add_cors
from service.frontend.client import EngineClient
from service.frontend.errors import install_error_handlers
from service.frontend.fastpath import StepsFastPath
from service.frontend.limits import BodyLimit, ConnectionLimit, SessionGate
from service.frontend.routes import classify, health, models, oip, sessions, stream
from service.frontend.state import Frontend
from service.metrics import FrontendMetrics

log = logging.getLogger("psn.frontend")
REQUEST_TIMEOUT_GRACE_S = 1.0  # a front end waits this much longer than the engine core's request deadline

DESCRIPTION = """Streaming inference for Parallel Spiking Neuron networks (arXiv 2304.12760).

Open a session for a model, send its input steps (over HTTP or the `/v1/stream` WebSocket, as JSON
or as binary frames) and get, per step, the output spikes, the class scores so far and the predicted
class. Steps of many sessions are computed together in batches by the engine core. Errors are
`{"error": {"code", "message", "field"}}`. When the server has API keys (`PSN_API_KEYS`), send one as
`Authorization: Bearer <key>` (WebSocket from a browser: the subprotocol `psn.key.<key>` next to
`psn.json.v1` or `psn.binary.v1`).
"""


# FastAPI 0.16x's native OpenTelemetry asks the environment for a configured provider on every request
# (a few us each, 3% of a refused request's CPU, py-spy): the service's metrics are Prometheus (/metrics)
NO_OTEL = ({"telemetry": {"tracing": False, "metrics": False, "logs": False}}
           if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


class HeadAsGet:
    """Every GET route answers HEAD too (RFC 9110: a HEAD is a GET without the body; load balancers probe
    /healthz with it): the app sees GET, and uvicorn, whose own scope still says HEAD, sends the headers
    (Content-Length included) without the body."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


def create_app(settings: Settings, engine_address: str, worker: int = 0) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = EngineClient(engine_address, settings.request_timeout_s + REQUEST_TIMEOUT_GRACE_S)
        app.state.frontend = Frontend(settings, client, app.state.metrics, worker)
        await client.start()
        # Take traffic only once the engine core has answered (a restarted worker must not answer 503
        # while its siblings can serve); if the engine core is still loading models, start anyway and
        # answer /healthz, with 503 not_ready elsewhere, until it is up.
        # A stop asked meanwhile (the supervisor's SIGTERM: the engine core failed to start, or Ctrl-C while
        # models load) ends the wait: uvicorn acts on it only once start-up is over.
        server = getattr(app.state, "server", None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.frontend_wait_s
        while not client.hello_seen.is_set() and not (server is not None and server.should_exit):
            left = deadline - loop.time()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.hello_seen.wait(), min(left, 0.1))
        # Everything loaded so far lives as long as the process: move it out of the collector's sight,
        # so full collections scan only request garbage (measured on the 2-core CPU with one process:
        # p99 at 256 WS sessions fell from ~270-430 ms to ~110-160 ms).
        gc.collect()
        gc.freeze()
        if server is not None and server.should_exit:
            log.info("front end %d stopping before it took connections", worker)
        else:
            log.info("front end %d up, engine core at %s", worker, engine_address)
        try:
            yield
        finally:
            await client.close()

    # No slash redirects: a path with a stray "/" is 404 not_found in the API's shape (/v2: the protocol's), as
    # docs/api.md says, not an empty 307 whose Location is built from the request's Host header
    app = FastAPI(title="psn-stream", version="0.2.0", description=DESCRIPTION, lifespan=lifespan,
                  redirect_slashes=False, **NO_OTEL)
    app.state.settings = settings
    app.state.metrics = FrontendMetrics()
    app.state.worker = worker
    app.add_middleware(StepsFastPath)  # innermost: JSON steps answered without FastAPI's routing (fastpath.py)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(SessionGate)  # refuses a full session's steps before BodyLimit reads the body
    # what AccessControl lets through: a keyless or foreign-origin WebSocket is refused (401/403) before
    # the limit would accept it to say the server is full
    app.add_middleware(ConnectionLimit, max_connections=settings.max_connections)
    if settings.key_hashes and settings.key_max_connections:  # inside AccessControl (the key's owner), outside the
        # limit: a key past its cap is refused before accept and takes no PSN_MAX_CONNECTIONS place
        app.add_middleware(KeyConnectionLimit, cap=settings.key_max_connections)
    app.add_middleware(AccessControl, settings=settings)  # before anything reads a body: keys, Origin
    add_cors(app, settings)  # outside AccessControl: answers preflights (no key), adds CORS headers to refusals
    app.add_middleware(HeadAsGet)  # outermost: every layer and route sees a HEAD as the GET it is
    install_error_handlers(app)
    for r in (models.router, sessions.router, stream.router, classify.router, health.router, oip.router,
              demo.router):
        app.include_router(r)
    return app
