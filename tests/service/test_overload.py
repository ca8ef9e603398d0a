"""Regressions found by the overload benchmark (bench/overload.py, BENCHMARKS.md): what a flood of HTTP
requests costs each front end."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import httpx
from fastapi.routing import APIRoute

from service.config import Settings
from service.frontend.app import create_app
from tests.service.conftest import Server


def _api_routes(routes) -> list[APIRoute]:
    """Every APIRoute, included routers opened (FastAPI 0.165 keeps them as lazy ``_IncludedRouter``s)."""
    out = []
    for r in routes:
        if isinstance(r, APIRoute):
            out.append(r)
        elif (inner := getattr(r, "original_router", None)) is not None:
            out += _api_routes(inner.routes)
    return out


def _dependency_calls(dependant) -> list:
    out = []
    for dep in dependant.dependencies:
        out += [dep.call, *_dependency_calls(dep)]
    return out


def test_no_route_runs_a_plain_function_in_the_thread_pool() -> None:
    """FastAPI runs a plain ``def`` endpoint or dependency in its thread pool: a thread hop per request."""
    app = create_app(Settings(), "unix:/nonexistent")
    routes = _api_routes(app.routes)
    assert {"/v1/sessions/{session_id}/steps", "/v1/classify", "/v2/models/{name}/infer"} <= {r.path for r in routes}
    sync = [f"{route.path}: {getattr(call, '__qualname__', call)}" for route in routes
            for call in (route.endpoint, *_dependency_calls(route.dependant))
            if call is not None and not inspect.iscoroutinefunction(call)]
    assert not sync, sync


def test_http_requests_start_no_threads_in_the_front_end(serve) -> None:
    """The front end serves the /v1 and /v2 HTTP routes on its event loop alone: no worker thread appears
    however many requests run at once (the session dependency used to take one of up to 40 pool threads
    per request: about 50 us of front-end CPU per request, and GIL contention under a flood)."""
    srv: Server = serve()
    pid = httpx.get(f"{srv.url}/healthz").json()["pid"]
    tasks = Path(f"/proc/{pid}/task")
    before = len(list(tasks.iterdir()))

    async def load() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
            sid = (await c.post("/v1/sessions", json={"model": "sliding"})).json()["session_id"]
            calls = [c.post(f"/v1/sessions/{sid}/steps", json={"steps": [[0.5, 0.5, 0.5]]}) for _ in range(24)]
            calls += [c.get(f"/v1/sessions/{sid}") for _ in range(8)]
            calls += [c.get("/v1/models"), c.get("/v1/models/sliding"), c.get("/v2/models/sliding"),
                      c.get("/v2/health/ready"), c.get("/v2/models/sliding/ready"),
                      c.post("/v1/classify", json={"model": "sliding", "steps": [[0.5, 0.5, 0.5]]})]
            rs = await asyncio.gather(*calls)
            assert all(r.status_code in (200, 429) for r in rs), [r.text for r in rs if r.status_code >= 400]
            assert (await c.delete(f"/v1/sessions/{sid}")).status_code == 204

    asyncio.run(load())
    assert len(list(tasks.iterdir())) == before
