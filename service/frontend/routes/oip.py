"""Open Inference Protocol v2 (KServe v2 / Triton REST) next to /v1: health, model metadata, infer.

``POST /v2/models/{name}/infer`` with Triton's sequence parameters streams: ``sequence_start`` opens
the sequence's session (its slot reset; a live one of that id starts over), each request applies the
input's time axis as new steps, ``sequence_end`` closes it after answering. Without a sequence id it
is ``/v1/classify`` over a batch of whole sequences. Errors are the protocol's ``{"error": "..."}``.

A sequence is a session with the id ``oip:{owner}:{model}:{sequence_id as JSON}`` (7 and "7" are two
sequences): with API keys, each key has its own sequence ids (key B's sequence 7 is not key A's), and
the engine core keeps each key to its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.errors import InvalidInput, ServiceError
from service.frontend.deps import FrontendDep, OwnerDep
from service.frontend.oip import (
    HEADER,
    ModelMetadata,
    check_request,
    input_steps,
    metadata,
    respond,
    sequence_id,
    sequence_session,
    split_body,
)
from service.frontend.state import Frontend

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])


def oip_error(err: ServiceError, fe: Frontend | None = None) -> JSONResponse:
    if fe is not None:
        fe.metrics.error(err.code)
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers())


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": "psn-stream", "version": "0.2.0", "extensions": ["binary_tensor_data", "sequence"]}


@router.get("/health/live", summary="The front end answers")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="The engine core answers, models loaded")
async def ready(fe: FrontendDep) -> Response:
    ok = await fe.client.ping(timeout=1.0)
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{name}", response_model=ModelMetadata, summary="Inputs and outputs of a model")
async def model_metadata(name: str, fe: FrontendDep) -> Any:
    try:
        return metadata(fe.codec(name))
    except ServiceError as e:
        return oip_error(e, fe)


@router.get("/models/{name}/ready", summary="The model can be served")
async def model_ready(name: str, fe: FrontendDep) -> Response:
    try:
        fe.codec(name)
    except ServiceError as e:
        return oip_error(e, fe)
    ok = await fe.client.ping(timeout=1.0)
    return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)


@router.post("/models/{name}/infer", summary="Infer: a batch of whole sequences, or the next steps of a sequence")
async def infer(name: str, request: Request, fe: FrontendDep, owner: OwnerDep) -> Response:
    try:
        codec = fe.codec(name)
        req, binary = split_body(await request.body(), request.headers.get(HEADER))
        check_request(req)
        x = input_steps(req, binary, codec, fe.settings.max_steps_per_request)  # (B, L, *input_shape)
        params = req.parameters or {}
        seq = sequence_id(params)
        if seq is not None:
            spikes, scores = await _sequence(fe, codec.name, seq, params, x, owner)
        else:
            spikes, scores = await _classify(fe, codec.name, x, owner)
        body, headers = respond(req, codec, spikes[None] if spikes.ndim == 2 else spikes,
                                scores[None] if scores.ndim == 2 else scores)
        return Response(body, headers=headers)
    except ServiceError as e:
        return oip_error(e, fe)


async def _sequence(fe: Frontend, model: str, seq: int | str, params: dict, x: np.ndarray,
                    owner: str) -> tuple[np.ndarray, ...]:
    if x.shape[0] != 1:
        raise InvalidInput(f"steps: a sequence request carries one sequence, shape [1, L, ...]; got batch "
                           f"{x.shape[0]}", field="steps")
    codec = fe.codec(model)
    sid = sequence_session(owner, model, seq)
    L = x.shape[1]
    flags = (bool(params.get("sequence_start")), bool(params.get("sequence_end")))  # strict booleans: checked
    try:  # (re)open, steps and close as one engine operation: no other request of the sequence between them
        start, replayed, seen, spikes, scores = await fe.steps(sid, codec, None, L, x[0].astype(codec.wire).tobytes(),
                                                               owner, sequence=flags)
    except ServiceError as e:
        if e.code in ("session_not_found", "session_closed", "session_expired", "session_lost"):
            raise InvalidInput(f"sequence_id {seq!r} of model {model!r} is not open ({e.code}): the first request "
                               "of a sequence must set sequence_start", field="sequence_start") from None
        if e.code == "session_moved":  # the /v1 wording tells the client to re-send with start, which OIP lacks
            e.message = (f"sequence_id {seq!r} of model {model!r} moved to another replica and this request was "
                         "not applied: send it again (the router sends it to the new one)")
        raise
    return codec.arrays(L, spikes, scores)


async def _classify(fe: Frontend, model: str, x: np.ndarray, owner: str) -> tuple[np.ndarray, np.ndarray]:
    codec = fe.codec(model)
    B, T = x.shape[:2]
    # one request each, sent together: the first is admitted or refused for all (EngineCore.classify)
    answers = await asyncio.gather(*(fe.client.call("classify", model, T, x[b].astype(codec.wire).tobytes(), owner,
                                                    B - 1 if b == 0 else 0, b > 0) for b in range(B)))
    pairs = [codec.arrays(T, sp, sc) for sp, sc in answers]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
