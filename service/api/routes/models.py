"""GET /v1/models, GET /v1/models/{name}."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.errors import error_responses
from service.api.views import model_info
from service.deps import EngineDep
from service.schemas import ModelInfo, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, summary="Every served model")
async def list_models(engine: EngineDep) -> dict:
    return {"models": [model_info(me) for me in engine.models.values()]}


@router.get("/{name}", response_model=ModelInfo, responses=error_responses(404), summary="One model")
async def get_model(name: str, engine: EngineDep) -> dict:
    return model_info(engine.model(name))
