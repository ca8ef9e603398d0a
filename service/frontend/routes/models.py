"""GET /v1/models, GET /v1/models/{name}."""

from __future__ import annotations

from fastapi import APIRouter, Query

from service.frontend.deps import FrontendDep
from service.frontend.errors import error_responses
from service.schemas import ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, responses=error_responses(503), summary="Every served model")
async def list_models(fe: FrontendDep, detail: bool = Query(False, description=(  # noqa: B008
        "true: each model's full metrics (training history included), as GET /v1/models/{name} gives"))) -> dict:
    fe.check_ready()
    return {"models": [m if detail else summary(m) for m in fe.models.values()]}


def summary(info: dict) -> dict:
    """A model's info with only the scalar metrics (the per-epoch history is most of its size)."""
    return {**info, "metrics": {k: v for k, v in info["metrics"].items() if not isinstance(v, list | dict)}}


@router.get("/{name}", response_model=ModelInfo, responses=error_responses(404, 503), summary="One model")
async def get_model(name: str, fe: FrontendDep) -> dict:
    return fe.models[fe.codec(name).name]
