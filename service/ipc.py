"""The one wire between front ends and the engine core: msgpack messages, length-prefixed, over a
Unix-domain stream socket (or TCP, ``tcp:HOST:PORT``, for an engine core on another host).

Why not ZeroMQ (which vLLM uses): measured on the 2-core CPU, one request/answer round trip through
pyzmq's asyncio socket cost 117 us of wall time and 75 us of front-end CPU (pyzmq's I/O thread and
edge-triggered wake-ups), against 21 us and 11 us for asyncio's own stream transport over a Unix
socket: at 1 step per message that difference is the whole per-message budget. The stream socket
also tells both ends at once when the other goes away (EOF), which is how a front end notices an
engine core that crashed, and how the engine core forgets a front end that did. Frames are
``u32 length`` (little-endian) + one msgpack document; msgpack keeps payloads as raw bytes (the
steps travel as little-endian floats, never as Python lists).

One frame carries a *list* of requests (front end -> engine core) or of answers (back): each side
coalesces everything it has ready into one frame per loop turn, so the per-frame cost is paid per
batch, not per request.

Requests: ``[rid, op, *args]`` (``rid`` > 0, unique per front end)::

    ["hello"]                                      -> {"models": [model info...], "engine": {...}}
    ["ping"]                                       -> {"ready": bool}
    ["open", model, watch, sid, owner, ahead]      -> session info (sid: None, or an OIP sequence's id;
                                                      ahead: steps sent next, refused now if they would be)
    ["get", session_id, watch, owner]              -> session info (watch: push "expired" to this front end)
    ["close", session_id, owner]                   -> session info (as it was closed)
    ["steps", session_id, start, L, bytes, owner]  -> [start, replayed, steps_seen, spikes, scores]
    ["sequence", sid, model, start, end, L, bytes, owner]  -> as "steps": an OIP sequence request in one
                                                      operation (reopen if start, the steps, close if end)
    ["classify", model, T, bytes, owner]           -> [spikes, scores]
    ["metrics"]                                    -> Prometheus text of the engine core

``owner`` (optional, default "") is who asks: a short id derived from the API key's hash, "" with
access control off; another owner's session is answered as one that does not exist, and per-owner
limits apply. ``start`` is -1 to append. Step payloads are ``L * prod(input_shape)`` floats in the model's wire dtype
(``float64`` for float64 models, else ``float32``). Output ``spikes`` are ``(L, ceil(n_out / 8))``
bytes, bit-packed little-endian per step (bit ``i`` of a step: byte ``i // 8``, bit ``i % 8``);
``scores`` are ``(L, num_classes)`` floats in the wire dtype.

Answers: ``[rid, 0, result]`` or ``[rid, status, [code, message, field, retry_after]]`` (the
``ServiceError`` to raise). Events pushed by the engine core: ``[0, "expired", session_id]``.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
from pathlib import Path
from typing import Any

import msgpack

from service.config import BadSetting
from service.errors import ServiceError

EVENT = 0  # rid of pushed events
OK = 0
LENGTH = struct.Struct("<I")
MAX_FRAME = 1 << 30  # a longer frame means a broken peer: the connection is closed


def default_address() -> str:
    """A Unix socket in a fresh private folder (the supervisor makes one per service)."""
    return "unix:" + os.path.join(tempfile.mkdtemp(prefix="psn-engine-"), "engine.sock")


def parse_address(address: str) -> tuple[str, str, int]:
    """``unix:PATH`` -> ("unix", PATH, 0); ``tcp:HOST:PORT`` -> ("tcp", HOST, PORT)."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return "unix", rest, 0
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return "tcp", host.strip("[]"), int(port)
    raise BadSetting(f"PSN_ENGINE_ADDRESS: expected unix:PATH or tcp:HOST:PORT, got {address!r}")


def listen(address: str, backlog: int) -> socket.socket:
    """A listening stream socket on ``unix:PATH`` (a stale socket file is replaced) or ``tcp:HOST:PORT``."""
    kind, where, port = parse_address(address)
    if kind == "unix":
        Path(where).unlink(missing_ok=True)  # left by a crashed engine core
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(where)
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in where else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((where, port))
    sock.listen(backlog)
    return sock


def pack(items: list[Any]) -> bytes:
    return msgpack.packb(items, use_bin_type=True)


def frame(items: list[Any]) -> bytes:
    """One length-prefixed frame of ``items``."""
    data = pack(items)
    return LENGTH.pack(len(data)) + data


def unpack(data: bytes | memoryview) -> list[Any]:
    return msgpack.unpackb(data, raw=False, use_list=True)


def error_answer(rid: int, err: ServiceError) -> list[Any]:
    return [rid, err.status, [err.code, err.message, err.field, err.retry_after]]


def raise_error(status: int, body: list[Any]) -> ServiceError:
    code, message, field, retry_after = body
    return ServiceError(message, field=field, retry_after=retry_after, status=status, code=code)
