"""The one wire between front ends and the engine core: ZeroMQ (DEALER -> ROUTER) carrying msgpack.

Why this library: pyzmq is the IPC vLLM v1 uses between its API servers and engine core; a ROUTER
socket gives each front end an identity (answers go back to the process that asked, a dead front
end's answers are dropped), the transport reconnects by itself when the engine core restarts, and a
socket monitor tells a front end at once when the engine core's end closes. msgpack keeps payloads
as raw bytes (the steps travel as little-endian floats, never as Python lists).

One ZeroMQ message carries a *list* of requests (front end -> engine core) or of answers (back):
each side coalesces everything it has ready into one message per loop turn, so the per-message cost
(tens of microseconds of Python) is paid per batch, not per request.

Requests: ``[rid, op, *args]`` (``rid`` > 0, unique per front end)::

    ["hello"]                               -> {"models": [model info...], "engine": {...}}
    ["ping"]                                -> {"ready": bool}
    ["open", model, watch]                  -> session info
    ["get", session_id, watch]              -> session info (watch: push "expired" to this front end)
    ["close", session_id]                   -> session info (as it was closed)
    ["steps", session_id, start, L, bytes]  -> [start, replayed, steps_seen, spikes, scores]
    ["classify", model, T, bytes]           -> [spikes, scores]
    ["metrics"]                             -> Prometheus text of the engine core

``start`` is -1 to append. Step payloads are ``L * prod(input_shape)`` floats in the model's wire dtype
(``float64`` for float64 models, else ``float32``). Output ``spikes`` are ``(L, ceil(n_out / 8))``
bytes, bit-packed little-endian per step (bit ``i`` of a step: byte ``i // 8``, bit ``i % 8``);
``scores`` are ``(L, num_classes)`` floats in the wire dtype.

Answers: ``[rid, 0, result]`` or ``[rid, status, [code, message, field, retry_after]]`` (the
``ServiceError`` to raise). Events pushed by the engine core: ``[0, "expired", session_id]``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import msgpack

from service.errors import ServiceError

EVENT = 0  # rid of pushed events
OK = 0


def default_address() -> str:
    """An ipc:// endpoint in a fresh private folder (the supervisor makes one per service)."""
    return "ipc://" + os.path.join(tempfile.mkdtemp(prefix="psn-engine-"), "engine.sock")


def pack(items: list[Any]) -> bytes:
    return msgpack.packb(items, use_bin_type=True)


def unpack(data: bytes | memoryview) -> list[Any]:
    return msgpack.unpackb(data, raw=False, use_list=True)


def error_answer(rid: int, err: ServiceError) -> list[Any]:
    return [rid, err.status, [err.code, err.message, err.field, err.retry_after]]


def raise_error(status: int, body: list[Any]) -> ServiceError:
    code, message, field, retry_after = body
    return ServiceError(message, field=field, retry_after=retry_after, status=status, code=code)
