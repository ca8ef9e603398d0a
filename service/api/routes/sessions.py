"""Sessions: open, inspect, close, and stream steps over HTTP."""

from __future__ import annotations

from fastapi import APIRouter, Body, Response

from service.api.errors import error_responses
from service.api.views import JSONText, session_info
from service.deps import EngineDep
from service.encode import join_object
from service.inputs import parse_steps
from service.schemas import SessionCreate, SessionInfo, StepsRequest, StepsResponse

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

STEPS_EXAMPLES = {
    "append": {"summary": "append two steps", "value": {"steps": [[0.5], [-1.2]]}},
    "retry": {"summary": "steps 4 and 5, e.g. a retry (answered from recent outputs if already applied)",
              "value": {"start": 4, "steps": [[0.1], [0.9]]}},
}


@router.post("", status_code=201, response_model=SessionInfo, responses=error_responses(404, 409, 422, 503),
             summary="Open a streaming session for a model")
async def create_session(body: SessionCreate, engine: EngineDep) -> dict:
    s = await engine.open_session(body.model)
    return session_info(engine, s)


@router.get("/{session_id}", response_model=SessionInfo, responses=error_responses(404, 410),
            summary="A session's state (404: never existed, 410: expired or closed)")
async def get_session(session_id: str, engine: EngineDep) -> dict:
    return session_info(engine, engine.sessions.get(session_id))


@router.delete("/{session_id}", status_code=204, responses=error_responses(404, 410), summary="Close a session")
async def delete_session(session_id: str, engine: EngineDep) -> Response:
    await engine.close_session(engine.sessions.get(session_id))
    return Response(status_code=204)


@router.post("/{session_id}/steps", response_model=StepsResponse,
             responses=error_responses(404, 409, 410, 413, 422, 503),
             summary="Apply one or more new steps; per step: index, spikes, scores, predicted class so far")
async def post_steps(session_id: str, engine: EngineDep,
                     body: StepsRequest = Body(openapi_examples=STEPS_EXAMPLES)) -> Response:  # noqa: B008
    engine.check_open()
    s = engine.sessions.get(session_id)
    me = engine.models[s.model]
    x = parse_steps(body.steps, me.cfg.input_shape, me.backend.dtype, engine.settings.max_steps_per_request)
    start, outputs, replayed = await me.step(s, x, body.start)
    return JSONText(join_object({"session_id": s.id, "start": start, "replayed": replayed, "steps_seen": s.t},
                                outputs))
