"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.schemas import Health

router = APIRouter(tags=["health"])


def replica(request: Request) -> str | None:
    """This replica's id when replicas share sessions (PSN_CLUSTER), else None."""
    fe = getattr(request.app.state, "frontend", None)
    return fe.settings.replica_id if fe is not None and fe.settings.cluster else None


def with_label(text: str, name: str, value: str) -> str:
    """Every sample of a Prometheus text exposition with one more label (a replica's id)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # the text format's escapes
    label = f'{name}="{escaped}"'
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            metric, sep, rest = line.partition("{")
            if sep:
                line = f"{metric}{{{label},{rest}" if not rest.startswith("}") else f"{metric}{{{label}{rest}"
            else:
                metric, _, value_part = line.partition(" ")
                line = f"{metric}{{{label}}} {value_part}"
        out.append(line)
    return "\n".join(out) + "\n"


# /readyz's fields left out: "models": [] here would tell an operator that no model is served
@router.get("/healthz", response_model=Health, response_model_exclude={"models", "session_store"},
            summary="Liveness: this front-end process answers")
async def healthz(request: Request) -> dict:
    fe = getattr(request.app.state, "frontend", None)
    hello = fe.client.hello if fe is not None and fe.client.connected else None
    return {"status": "ok", "worker": request.app.state.worker, "pid": os.getpid(),
            "engine_pid": hello["engine"]["pid"] if hello else None, "replica": replica(request)}


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}},
            summary="Readiness: the engine core answers, its models are loaded and warmed up, not shutting down")
async def readyz(request: Request) -> JSONResponse:
    fe = getattr(request.app.state, "frontend", None)
    ready = await fe.client.readiness(timeout=1.0) if fe is not None else None
    if ready is None:
        return JSONResponse({"status": "not_ready", "models": [], "worker": request.app.state.worker},
                            status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"status": "ready", "models": sorted(fe.models), "worker": request.app.state.worker,
                         "session_store": ready.get("session_store")})


@router.get("/metrics", summary="Prometheus metrics: the engine core's and this front end's", response_class=Response)
async def metrics(request: Request) -> Response:
    fe = getattr(request.app.state, "frontend", None)
    engine = ""
    if fe is not None and fe.client.connected:
        try:
            engine = await asyncio.wait_for(fe.client.call("metrics"), 2.0)
        except Exception:  # noqa: BLE001 - the front end's own metrics still answer
            engine = "# engine core metrics unavailable\n"
    text = engine + request.app.state.metrics.text()
    rid = replica(request)
    if rid is not None:  # one scrape target per replica; dashboards group by replica
        text = with_label(text, "replica", rid)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
