"""Dependencies: the engine and settings live on ``app.state`` (made in the lifespan) and reach routes here."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from service.config import Settings
from service.engine.engine import Engine
from service.errors import NotReady


def get_engine(conn: HTTPConnection) -> Engine:
    engine = getattr(conn.app.state, "engine", None)
    if engine is None:
        raise NotReady("the service is starting; retry shortly", retry_after=1)
    return engine


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
