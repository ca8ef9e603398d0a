"""POST /v1/classify: a whole sequence in parallel form."""

from __future__ import annotations

import json

from fastapi import APIRouter, Response

from service.api.errors import error_responses
from service.api.views import JSONText
from service.deps import EngineDep
from service.encode import join_object
from service.inputs import parse_steps
from service.schemas import ClassifyRequest, ClassifyResponse

router = APIRouter(prefix="/v1", tags=["classify"])


@router.post("/classify", response_model=ClassifyResponse, responses=error_responses(404, 413, 422, 503),
             summary="Classify a whole sequence (parallel form; the same outputs as streaming it)")
async def classify(body: ClassifyRequest, engine: EngineDep) -> Response:
    engine.check_open()
    me = engine.model(body.model)
    x = parse_steps(body.steps, me.cfg.input_shape, me.backend.dtype, engine.settings.max_steps_per_request)
    outputs = await me.classify(x)
    last = json.loads(outputs[-1])
    return JSONText(join_object({"model": me.name, "predicted": last["predicted"], "label": last["label"],
                                 "scores": last["scores"]}, outputs))
