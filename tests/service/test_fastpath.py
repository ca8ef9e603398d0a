"""``StepsFastPath``: ``POST /v1/sessions/{id}/steps`` with a JSON body that validates is answered without
FastAPI's routing and dependency machinery, with the same answers; everything else goes on to the app with
its body intact. Unit tests drive the middleware with a fake engine core (test_frontend_state.py's); the
real-server test compares its answers with the FastAPI route's for the same requests."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from service.frontend.auth import OWNER
from service.frontend.fastpath import StepsFastPath
from service.metrics import FrontendMetrics
from tests.service.conftest import Reference, Server, assert_outputs
from tests.service.test_frontend_state import Sent, frontend, receiving

JSON = [(b"content-type", b"application/json")]


class Inner:
    """The app behind the fast path: records what reached it (scope and the whole body)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        self.seen.append((scope["path"], body))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})


def request(path: str, body: bytes, headers: list | None = None, query: bytes = b"", owner: str = "a",
            fe: Any = None) -> tuple[dict, Any]:
    app = SimpleNamespace(state=SimpleNamespace(frontend=fe, metrics=fe.metrics if fe else FrontendMetrics()))
    scope = {"type": "http", "method": "POST", "path": path, "headers": JSON if headers is None else headers,
             "query_string": query, "app": app, OWNER: owner}
    half = len(body) // 2  # in two pieces, as a body may come
    return scope, receiving({"type": "http.request", "body": body[:half], "more_body": True},
                            {"type": "http.request", "body": body[half:], "more_body": False})


def test_a_valid_json_steps_request_is_answered_without_the_app() -> None:
    async def run() -> None:
        fe, engine = frontend()
        engine.sessions[("a", "s1")] = "m"
        inner, sent = Inner(), Sent()
        scope, receive = request("/v1/sessions/s1/steps", b'{"steps": [[0.5, -1.0], [2.0, 0.25]], "start": 3}',
                                 headers=[(b"content-type", b"Application/JSON; charset=utf-8")], fe=fe)
        task = asyncio.create_task(StepsFastPath(inner)(scope, receive, sent))
        for _ in range(5):
            await asyncio.sleep(0)
        (args,) = engine.asked("steps")
        assert args[:3] == ("s1", 3, 2) and args[4] == "a"  # session, start, L; the key's owner
        assert np.frombuffer(args[3], "<f4").tolist() == [0.5, -1.0, 2.0, 0.25]
        spikes, scores = bytes([0b101, 0b010]), np.array([[1, 3, 2], [0, 0, 5]], "<f4").tobytes()
        next(f for m, _, f in engine.calls if m == "steps").set_result([3, 1, 5, spikes, scores])
        await asyncio.wait_for(task, 1)
        assert inner.seen == [] and sent.status() == 200
        got = sent.json()
        assert {k: got[k] for k in ("session_id", "start", "replayed", "steps_seen")} == \
            {"session_id": "s1", "start": 3, "replayed": 1, "steps_seen": 5}
        assert [o["index"] for o in got["outputs"]] == [3, 4]
        assert [o["spikes"] for o in got["outputs"]] == [[1, 0, 1], [0, 1, 0]]
        assert [o["predicted"] for o in got["outputs"]] == [1, 2] and got["outputs"][1]["label"] == "c"

    asyncio.run(run())


@pytest.mark.parametrize("content_type", [b"application/json", b"APPLICATION/JSON", b"application/json ;charset=utf-8"])
def test_json_however_spelt_in_one_body_message_takes_the_fast_path(content_type: bytes) -> None:
    """The media type is case-insensitive and may have whitespace before its parameters (RFC 9110's OWS); a
    body may come in one message without ``more_body``, which ASGI then reads as the last."""
    async def run() -> None:
        fe, engine = frontend()
        engine.sessions[("a", "s1")] = "m"
        inner, sent = Inner(), Sent()
        scope, _ = request("/v1/sessions/s1/steps", b"", headers=[(b"content-type", content_type)], fe=fe)
        receive = receiving({"type": "http.request", "body": b'{"steps": [[0.5, 1.0]]}'})
        task = asyncio.create_task(StepsFastPath(inner)(scope, receive, sent))
        for _ in range(5):
            await asyncio.sleep(0)
        assert [a[:3] for a in engine.asked("steps")] == [("s1", -1, 1)] and inner.seen == []
        task.cancel()

    asyncio.run(run())


@pytest.mark.parametrize("body,headers,path", [
    (b'{"steps": [[0.5, 1.0]]', None, "/v1/sessions/s1/steps"),  # malformed JSON: FastAPI's error
    (b'[[0.5, 1.0]]', None, "/v1/sessions/s1/steps"),  # not an object
    (b'{"steps": [[0.5, 1.0]], "strat": 0}', None, "/v1/sessions/s1/steps"),  # does not validate
    (b'{"steps": [[0.5, 1.0]], "start": true}', None, "/v1/sessions/s1/steps"),
    (b'', None, "/v1/sessions/s1/steps"),  # no body
    (b'{"steps": [[0.5, 1.0]]}', [(b"content-type", b"text/plain")], "/v1/sessions/s1/steps"),
    (b'{"steps": [[0.5, 1.0]]}', [], "/v1/sessions/s1/steps"),  # no content type
    (b'{"steps": [[0.5, 1.0]]}', None, "/v1/sessions//steps"),  # no id
    (b'{"steps": [[0.5, 1.0]]}', None, "/v1/sessions/a/b/steps"),  # not the route
    (b'{"steps": [[0.5, 1.0]]}', None, "/v1/sessions/s1/steps/"),
    (b'{"model": "m"}', None, "/v1/sessions"),
])
def test_everything_else_goes_on_to_the_app_with_its_body_intact(body: bytes, headers: list | None,
                                                                   path: str) -> None:
    async def run() -> None:
        fe, engine = frontend()
        inner, sent = Inner(), Sent()
        scope, receive = request(path, body, headers, fe=fe)
        await asyncio.wait_for(StepsFastPath(inner)(scope, receive, sent), 1)
        assert inner.seen == [(path, body)] and sent.status() == 299
        assert engine.calls == []

    asyncio.run(run())


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "GET"])
def test_a_steps_request_by_another_method_goes_on_to_the_app(method: str) -> None:
    """Only POST applies steps: the app answers the others (405), even with a body that would validate."""
    async def run() -> None:
        fe, engine = frontend()
        engine.sessions[("a", "s1")] = "m"
        inner, sent = Inner(), Sent()
        scope, receive = request("/v1/sessions/s1/steps", b'{"steps": [[0.5, 1.0]]}', fe=fe)
        scope["method"] = method
        await asyncio.wait_for(StepsFastPath(inner)(scope, receive, sent), 1)
        assert inner.seen == [("/v1/sessions/s1/steps", b'{"steps": [[0.5, 1.0]]}')] and sent.status() == 299
        assert engine.calls == []

    asyncio.run(run())


def test_its_errors_are_the_apps_error_answers() -> None:
    async def run() -> None:
        fe, engine = frontend()
        for query, path, status, code, field in ((b"start=0", "/v1/sessions/s1/steps", 422, "invalid_input", "start"),
                                                 (b"", "/v1/sessions/nope/steps", 404, "session_not_found", None)):
            inner, sent = Inner(), Sent()
            scope, receive = request(path, b'{"steps": [[0.5, 1.0]]}', query=query, fe=fe)
            await asyncio.wait_for(StepsFastPath(inner)(scope, receive, sent), 1)
            assert inner.seen == [] and sent.status() == status
            err = sent.json()["error"]
            assert err["code"] == code and (field is None or err["field"] == field), err
        assert engine.asked("steps") == []  # neither reached the engine core's steps
        assert 'psn_errors_total{code="session_not_found"} 1.0' in fe.metrics.text()
        inner, sent = Inner(), Sent()  # a front end still starting (no state yet): 503, as the route answers
        scope, receive = request("/v1/sessions/s1/steps", b'{"steps": [[0.5, 1.0]]}', fe=None)
        await asyncio.wait_for(StepsFastPath(inner)(scope, receive, sent), 1)
        assert sent.status() == 503 and sent.json()["error"]["code"] == "not_ready"
        head = next(m for m in sent if m["type"] == "http.response.start")
        assert any(k == b"retry-after" for k, _ in head["headers"])

    asyncio.run(run())


def test_a_client_that_leaves_before_its_body_ends_gets_nothing() -> None:
    async def run() -> None:
        fe, engine = frontend()
        inner, sent = Inner(), Sent()
        scope, _ = request("/v1/sessions/s1/steps", b"{}", fe=fe)
        receive = receiving({"type": "http.request", "body": b'{"steps": ', "more_body": True},
                            {"type": "http.disconnect"})
        await asyncio.wait_for(StepsFastPath(inner)(scope, receive, sent), 1)
        assert sent == [] and inner.seen == [] and engine.calls == []

    asyncio.run(run())


def test_the_fast_path_and_the_route_give_the_same_answers(server: Server, ref: Reference) -> None:
    """The same requests to two sessions, one as ``application/json`` (the fast path) and one as
    ``application/x-psn+json`` (a JSON type only FastAPI's route takes): the same answers, byte for byte."""
    x = ref.sequence("sliding", 6, seed=31)
    with httpx.Client(base_url=server.url) as c:
        sids = [c.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"] for _ in range(2)]
        kinds = ("application/json", "application/x-psn+json")
        bodies = [{"steps": x[:2].tolist()}, {"steps": x[:2].tolist(), "start": 0},  # a retry: replayed
                  {"steps": x[2:].tolist(), "start": 2}, {"steps": [[1.0, 2.0]]}, {"steps": x[:1].tolist(), "start": 9},
                  {"steps": [[0.5, True, 0.5]]}, {"steps": [[3e38, 3e38, 3.5e38]]}]
        for body in bodies:
            answers = []
            for sid, kind in zip(sids, kinds, strict=True):
                r = c.post(f"/v1/sessions/{sid}/steps", content=json.dumps(body), headers={"content-type": kind})
                answers.append((r.status_code, r.text.replace(sid, "SID"), r.headers.get("content-type")))
            assert answers[0] == answers[1], (body, answers)
        for sid in sids:  # both sessions advanced alike, and as the paper's loop says
            answer = c.post(f"/v1/sessions/{sid}/steps", json={"steps": x.tolist(), "start": 0})
            assert answer.headers["content-type"] == "application/json"
            r = answer.json()
            assert r["replayed"] == 6 and r["steps_seen"] == 7
            assert_outputs(r["outputs"], ref.outputs("sliding", x))


def test_the_app_runs_the_fast_path_inside_the_body_limit() -> None:
    """Innermost, so that every limit and the key check have run first (BodyLimit has read the body within
    PSN_MAX_REQUEST_BYTES, SessionGate has refused a full session, AccessControl has set the owner)."""
    from service.config import Settings
    from service.frontend.app import create_app
    from service.frontend.limits import BodyLimit, SessionGate

    app = create_app(Settings(), "unix:/nonexistent/engine.sock")
    order = [m.cls for m in app.user_middleware]  # outermost first
    assert order[-1] is StepsFastPath
    assert order.index(SessionGate) < order.index(BodyLimit) < order.index(StepsFastPath)
