"""A full session's steps refused from uvicorn's HTTP protocol, before any ASGI machinery runs.

``SessionGate`` (limits.py) answers ``POST /v1/sessions/{id}/steps`` with 429 ``session_queue_full``
when this front end alone has ``PSN_SESSION_QUEUE`` requests of the session unanswered, but it runs
inside the ASGI stack: each refusal still pays for uvicorn's request cycle and task, the scope, every
middleware and two ``send`` calls, 130-200 us of a front end's CPU (wrk; BENCHMARKS.md), so a client
that ignores ``Retry-After`` and floods one session keeps a front end's event loop busy, and every
other session on it waits. ``FastRefusal.answer`` gives the same answer (same status, body, headers,
metric) from the protocol's parser callbacks (``protocols.http_protocol``), for the plain case only:
no ``Origin`` header (CORS and the Origin policy stay with the app), a valid key or none needed (any
other key problem is the app's 401), no request of the connection still being answered (answers keep
their order), and a client that reads its answers. Anything else goes the ASGI way, where
``SessionGate`` answers the same refusal.
"""

from __future__ import annotations

from typing import Any

from service.config import Settings
from service.frontend.auth import KeyRing, bearer_key
from service.frontend.limits import ADMITTED, STEPS_PREFIX, STEPS_SUFFIX, error_answer, raw_answer

PREFIX, SUFFIX = STEPS_PREFIX.encode(), STEPS_SUFFIX.encode()


class FastRefusal:
    def __init__(self, app: Any, settings: Settings):
        self.app = app  # the front end's FastAPI app: its state.frontend appears with the lifespan
        self.keys = KeyRing(settings.key_hashes) if settings.key_hashes else None
        self.answers: dict[tuple[bytes, str, str], tuple[list, bytes]] = {}

    def answer(self, method: bytes, url: bytes, scope: dict[str, Any],
               default_headers: list[tuple[bytes, bytes]]) -> bytes | None:
        """The whole HTTP answer (keep-alive) refusing this request, or None to let the app handle it.
        ``scope``: the request's ASGI scope as far as uvicorn has filled it (its ``headers``, names
        lower-case); a steps request let through is marked in it and counted against its session's
        bound until it reaches ``SessionGate`` (requests that arrive together are let through only as
        far as the bound allows, though none has reached the app yet); ``default_headers``: uvicorn's
        own (``date``, ``server``), which every answer carries."""
        if method != b"POST":
            return None
        path = url.partition(b"?")[0]
        if not (path.startswith(PREFIX) and path.endswith(SUFFIX)):
            return None
        frontend = getattr(self.app.state, "frontend", None)
        if frontend is None:
            return None
        raw = path[len(PREFIX):-len(SUFFIX)]
        if not raw or not raw.isascii() or b"/" in raw or b"%" in raw:  # the app decodes and answers those
            return None
        authorization = None
        for name, value in scope["headers"]:
            if name == b"origin":
                return None
            if name == b"authorization":
                authorization = value
        owner: str | None = ""
        if self.keys is not None:
            key = bearer_key(authorization) if authorization is not None else None
            owner = self.keys.owner(key) if key else None
            if owner is None:
                return None
        sid = raw.decode("ascii")
        err = frontend.admit(sid, owner)
        if err is None:
            scope[ADMITTED] = (frontend, (owner, sid))
            return None
        self.app.state.metrics.error(err.code)
        key = (path, owner, err.message)
        cached = self.answers.get(key)
        if cached is not None and cached[0] is default_headers:  # uvicorn renews its list as the date changes
            return cached[1]
        if len(self.answers) >= 1024:
            self.answers.clear()
        headers, data = error_answer(err, path)
        answer = raw_answer(err.status, [*default_headers, *headers], data)
        self.answers[key] = (default_headers, answer)  # a flood gets the same answer many times a second
        return answer
