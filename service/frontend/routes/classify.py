"""POST /v1/classify: a whole sequence in parallel form."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response

from service.frontend.codec import join_object, may_hold_booleans
from service.frontend.deps import FrontendDep, OwnerDep
from service.frontend.errors import error_responses
from service.frontend.views import JSONText
from service.schemas import ClassifyRequest, ClassifyResponse

router = APIRouter(prefix="/v1", tags=["classify"])


@router.post("/classify", response_model=ClassifyResponse, responses=error_responses(401, 404, 413, 422, 429, 503),
             summary="Classify a whole sequence (parallel form; the same outputs as streaming it)")
async def classify(body: ClassifyRequest, fe: FrontendDep, owner: OwnerDep, request: Request) -> Response:
    codec = fe.codec(body.model)
    T, payload = codec.json_steps(body.steps, fe.settings.max_steps_per_request,
                                  maybe_bools=may_hold_booleans(await request.body()))  # the body, already read
    spikes, scores = await fe.client.call("classify", codec.name, T, payload, owner)
    last = codec.arrays(T, spikes, scores)[1][-1]
    predicted = int(last.argmax())
    return JSONText(join_object({"model": codec.name, "predicted": predicted, "label": codec.labels[predicted],
                                 "scores": json.loads("[" + codec.score_text(last) + "]")},
                                codec.json_outputs(0, T, spikes, scores)))
