"""Response helpers."""

from __future__ import annotations

from fastapi import Response


class JSONText(Response):
    """A response whose body is JSON text built by ``service.frontend.codec`` (already serialised)."""

    media_type = "application/json"
