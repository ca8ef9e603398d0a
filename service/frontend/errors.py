"""Error responses: every refusal is ``{"error": {"code", "message", "field"}}`` with its status (under
``/v2``, the Open Inference Protocol's ``{"error": "message"}``)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.errors import InvalidInput, ServiceError, internal
from service.schemas import ErrorResponse, unknown_field

log = logging.getLogger("psn.api")


def error_responses(*statuses: int) -> dict:
    """OpenAPI ``responses=`` entry documenting the error body for these statuses."""
    return {s: {"model": ErrorResponse} for s in statuses}


def body_model(request: Request) -> type[BaseModel] | None:
    """The pydantic model of the matched route's JSON body, if it has one."""
    field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def validation_error(exc: RequestValidationError, model: type[BaseModel] | None = None,
                     content_type: str | None = None) -> InvalidInput:
    errs = exc.errors()
    first = errs[0] if errs else {}
    if first.get("type") == "model_attributes_type" and isinstance(first.get("input"), bytes):
        # FastAPI reads a body as JSON only under a JSON Content-Type; else the model got the raw bytes, and
        # "body: Input should be a valid dictionary" would be said of a body that may well be a JSON object
        got = f"got {content_type[:60]!r}" if content_type else "the request has none"
        return InvalidInput(f"Content-Type: a body is read as JSON only with Content-Type: application/json; {got}",
                            field="Content-Type")
    if first.get("type") == "json_invalid":  # FastAPI puts the character offset into loc: not a field
        loc = first.get("loc", ())
        where = f" at character {loc[-1]}" if len(loc) > 1 and isinstance(loc[-1], int) else ""
        detail = (first.get("ctx") or {}).get("error", "")
        return InvalidInput(f"body: malformed JSON{where}" + (f": {detail}" if detail else ""), field="body")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    if first.get("type") == "extra_forbidden":
        return InvalidInput(unknown_field(field, model if len(loc) == 1 else None), field=field)
    return InvalidInput(f"{field}: {first.get('msg', 'invalid request')}", field=field)


def body_parse_error(cause: BaseException) -> InvalidInput:
    """A body FastAPI could not parse for another reason than bad JSON syntax (it answers 400 for those)."""
    if isinstance(cause, RecursionError):
        return InvalidInput("body: JSON nested too deeply to parse", field="body")
    if isinstance(cause, UnicodeError):
        return InvalidInput("body: not valid UTF-8 JSON", field="body")
    return InvalidInput(f"body: could not be parsed as JSON ({type(cause).__name__})", field="body")


METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """The methods some route takes on the request's path (HEAD wherever GET: ``app.HeadAsGet``), for a 405's
    ``Allow``: each asked of the routes as the router would. Starlette's own header names only the first
    matching route's methods (GET, not DELETE, for /v1/sessions/{id})."""
    routes = request.app.router.routes
    allowed = [m for m in METHODS
               if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)]
    return sorted(allowed + ["HEAD"] if "GET" in allowed else allowed)


def error_response(request: Request, err: ServiceError) -> JSONResponse:
    """The app's answer to ``err`` (counted in ``psn_errors_total``)."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.error(err.code)
    return JSONResponse(err.body_for(request.url.path), status_code=err.status, headers=err.headers())


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, validation_error(exc, body_model(request),
                                                        request.headers.get("content-type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI failed to parse the body
            return error_response(request, body_parse_error(exc.__cause__))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        field = "path" if exc.status_code == 404 else "method" if exc.status_code == 405 else None
        allow = allowed_methods(request) if exc.status_code == 405 else []
        if allow:
            message += f"; allowed: {', '.join(allow)}"
        response = error_response(request, ServiceError(message, status=exc.status_code, code=code, field=field))
        if allow:  # RFC 9110: a 405 says which methods the resource takes
            response.headers["Allow"] = ", ".join(allow)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(request, internal(exc))
