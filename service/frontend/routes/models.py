"""GET /v1/models, GET /v1/models/{name}."""

from __future__ import annotations

from fastapi import APIRouter

from service.frontend.deps import FrontendDep
from service.frontend.errors import error_responses
from service.schemas import ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, responses=error_responses(503), summary="Every served model")
async def list_models(fe: FrontendDep) -> dict:
    fe.check_ready()
    return {"models": list(fe.models.values())}


@router.get("/{name}", response_model=ModelInfo, responses=error_responses(404, 503), summary="One model")
async def get_model(name: str, fe: FrontendDep) -> dict:
    return fe.models[fe.codec(name).name]
