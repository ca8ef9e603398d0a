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


FrontendDep = Annotated[Frontend, Depends(get_frontend)]


def get_owner(conn: HTTPConnection) -> str:
    """The owner id of the request's API key ("" with access control off), set by ``AccessControl``."""
    return conn.scope.get(OWNER, "")


OwnerDep = Annotated[str, Depends(get_owner)]
