"""Dependencies: the front end's state lives on ``app.state`` (made in the lifespan) and reaches routes here."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from service.errors import NotReady
from service.frontend.auth import OWNER
from service.frontend.state import Frontend


def get_frontend(conn: HTTPConnection) -> Frontend:
    fe = getattr(conn.app.state, "frontend", None)
    if fe is None:
        raise NotReady("the service is starting; retry shortly", retry_after=1)
    return fe



async def _frontend(conn: HTTPConnection) -> Frontend:
    """``get_frontend`` as a coroutine: FastAPI runs a plain ``def`` dependency in its thread pool, a thread
    hop on every HTTP request (about 50 us of a front end's CPU per request on the 2-core box, and up to 40
    threads contending for the GIL under a flood; bench/overload.py)."""
    return get_frontend(conn)


FrontendDep = Annotated[Frontend, Depends(_frontend)]


async def get_owner(conn: HTTPConnection) -> str:
    """The owner id of the request's API key ("" with access control off), set by ``AccessControl``
    (a coroutine, like ``_frontend``: no thread hop)."""
    return conn.scope.get(OWNER, "")


OwnerDep = Annotated[str, Depends(get_owner)]
