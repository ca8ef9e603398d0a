"""``POST /v1/sessions/{id}/steps`` with a JSON body that parses and validates, answered without FastAPI's
routing, dependency solving and request handler (``bench/http_steps.sh``: a third of what a 1-step request
cost a front end, 517-591 -> 338-355 us on the 2-core CPU). Same answers, from the same code: the body is validated by
``StepsRequest`` and answered by ``routes.sessions.steps_answer``, and errors are the app's error
responses. Anything else, including every body that does not parse or validate (their errors are
FastAPI's), goes on to the app, with the body handed on as it came; the route in ``routes/sessions.py``
stays, for those and for the API docs."""

from __future__ import annotations

import json

from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ServiceError
from service.frontend.auth import OWNER
from service.frontend.deps import get_frontend
from service.frontend.errors import error_response
from service.frontend.limits import replaying, steps_session
from service.frontend.routes.sessions import refuse_start_in_url, steps_answer
from service.schemas import StepsRequest


def json_content(scope: Scope) -> bool:
    """Whether the request says its body is ``application/json`` (parameters such as charset aside)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.partition(b";")[0].strip().lower() == b"application/json"
    return False


class StepsFastPath:
    """Innermost of the front end's middleware (inside ``BodyLimit``, which has read the body)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not json_content(scope):
            return await self.app(scope, receive, send)
        sid = steps_session(scope["path"])
        if sid is None:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left: nothing to answer
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        raw = b"".join(chunks)
        body = self._parse(raw)
        if body is None:  # FastAPI's own answer (a body error): the body handed on as it came
            return await self.app(scope, replaying(raw, receive), send)
        request = Request(scope, receive)
        try:
            fe = get_frontend(request)
            refuse_start_in_url(request)
            response = await steps_answer(fe, sid, scope.get(OWNER, ""), body, raw)
        except ServiceError as err:
            response = error_response(request, err)
        await response(scope, receive, send)

    @staticmethod
    def _parse(raw: bytes) -> StepsRequest | None:
        try:
            obj = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict):
            return None
        try:
            return StepsRequest.model_validate(obj)
        except ValidationError:
            return None
