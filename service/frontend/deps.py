"""Dependencies: the front end's state lives on ``app.state`` (made in the lifespan) and reaches routes here."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from service.errors import NotReady
from service.frontend.state import Frontend


def get_frontend(conn: HTTPConnection) -> Frontend:
    fe = getattr(conn.app.state, "frontend", None)
    if fe is None:
        raise NotReady("the service is starting; retry shortly", retry_after=1)
    return fe


FrontendDep = Annotated[Frontend, Depends(get_frontend)]
