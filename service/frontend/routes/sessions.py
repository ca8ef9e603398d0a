"""Sessions: open, inspect, close, and stream steps over HTTP."""

from __future__ import annotations

from fastapi import APIRouter, Body, Request, Response

from service.errors import InvalidInput
from service.frontend.codec import join_object, may_hold_booleans
from service.frontend.deps import FrontendDep, OwnerDep
from service.frontend.errors import error_responses
from service.frontend.state import Frontend
from service.frontend.views import JSONText
from service.schemas import SessionCreate, SessionInfo, StepsRequest, StepsResponse

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

STEPS_EXAMPLES = {
    "append": {"summary": "append two steps", "value": {"steps": [[0.5], [-1.2]]}},
    "retry": {"summary": "steps 4 and 5, e.g. a retry (answered from recent outputs if already applied)",
              "value": {"start": 4, "steps": [[0.1], [0.9]]}},
}


@router.post("", status_code=201, response_model=SessionInfo, responses=error_responses(401, 404, 409, 422, 429, 503),
             summary="Open a streaming session for a model")
async def create_session(body: SessionCreate, fe: FrontendDep, owner: OwnerDep) -> dict:
    fe.codec(body.model)
    return fe.remember(await fe.client.call("open", body.model, False, None, owner), owner)


@router.get("/{session_id}", response_model=SessionInfo, responses=error_responses(401, 404, 410, 503),
            summary="A session's state (404: never existed or another key's, 410: expired or closed)")
async def get_session(session_id: str, fe: FrontendDep, owner: OwnerDep) -> dict:
    fe.check_ready()
    return fe.remember(await fe.client.call("get", session_id, False, owner), owner)


@router.delete("/{session_id}", status_code=204, responses=error_responses(401, 404, 410, 503),
               summary="Close a session")
async def delete_session(session_id: str, fe: FrontendDep, owner: OwnerDep) -> Response:
    fe.check_ready()
    await fe.client.call("close", session_id, owner)
    return Response(status_code=204)


@router.post("/{session_id}/steps", response_model=StepsResponse,
             responses=error_responses(401, 404, 409, 410, 413, 422, 429, 503),
             summary="Apply one or more new steps; per step: index, spikes, scores, predicted class so far")
async def post_steps(session_id: str, fe: FrontendDep, owner: OwnerDep, request: Request,
                     body: StepsRequest = Body(openapi_examples=STEPS_EXAMPLES)) -> Response:  # noqa: B008
    # Most of these requests never get here: ``fastpath.StepsFastPath`` answers those whose JSON body
    # parses and validates with the same two functions, without FastAPI's machinery.
    refuse_start_in_url(request)
    return await steps_answer(fe, session_id, owner, body, await request.body())  # the body, already read


def refuse_start_in_url(request: Request) -> None:
    if "start" in request.query_params:  # ignored, it would append: a retry sent so applies its steps twice
        raise InvalidInput("start: goes in the JSON body ({\"steps\": ..., \"start\": N}), not in the URL",
                           field="start")


async def steps_answer(fe: Frontend, session_id: str, owner: str, body: StepsRequest, raw: bytes) -> JSONText:
    """The answer to a steps request whose body (``raw``, as it came) validated as ``body``."""
    fe.check_ready()
    codec = await fe.session_codec(session_id, owner)
    L, payload = codec.json_steps(body.steps, fe.settings.max_steps_per_request, maybe_bools=may_hold_booleans(raw))
    start, replayed, seen, spikes, scores = await fe.steps(session_id, codec, body.start, L, payload, owner)
    return JSONText(join_object({"session_id": session_id, "start": start, "replayed": replayed, "steps_seen": seen},
                                codec.json_outputs(start, L, spikes, scores)))
