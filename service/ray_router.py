"""Ray Serve request router for psn-stream replicas: Ray's consistent-hash router keyed on the session id
taken from the request itself (``docs/cluster.md``).

Ray 2.60's ``ConsistentHashRouter`` hashes ``RequestMetadata.session_id``, which its proxy fills from one
request header (``x-session-id``). A browser's WebSocket cannot set headers, and no client of this API
has to, so the key comes from the URL, where every request that concerns a session names it:

- ``/v1/sessions/{id}`` and ``/v1/sessions/{id}/steps``: the path;
- ``/v1/stream?session_id={id}``: the query (attaching to a session over WebSocket);
- ``POST /v2/models/{name}/infer`` with a ``sequence_id`` parameter (an Open Inference Protocol sequence):
  the id is in the body, which Ray's proxy does not read, so the replica that gets the request reads
  it and sends it through the proxy again with the key ``oip:{name}:{sequence_id}`` in the session
  header (``service.ray.Replica.oip_infer``);
- an ``x-session-id`` header still wins when a client sends one.

Requests that name no session (opening one, ``/v1/models``, ``/metrics``) hash their request id: spread
uniformly over the replicas, so new sessions are balanced. Only imported in Ray's proxy process.
"""

from __future__ import annotations

import json
import pickle
from typing import Any
from urllib.parse import parse_qs

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter


def session_key(path: str, query: bytes | str = b"") -> str | None:
    """The session a request concerns, from its path and query string (None: it names none)."""
    if path.startswith("/v1/sessions/"):
        sid = path.split("/", 4)[3]
        return sid or None
    if path == "/v1/stream" and query:
        q = query.decode("latin-1") if isinstance(query, bytes) else query
        sid = parse_qs(q).get("session_id", [""])[0]
        return sid or None
    return None


def oip_sequence_key(name: str, body: bytes, header_length: str | None = None) -> str | None:
    """The routing key of an OIP v2 infer request for model ``name``: ``oip:{name}:{sequence_id}`` when its
    parameters name a sequence, None otherwise (a batch of whole sequences: any replica, and a body the
    service will refuse: any replica refuses it the same). ``header_length``: the binary tensor extension's
    Inference-Header-Content-Length (the JSON is the body's first that many bytes)."""
    n = int(header_length) if header_length is not None and header_length.isdigit() else len(body)
    from service.errors import InvalidInput  # the replica's import, not the proxy's
    from service.frontend.oip import sequence_id

    try:
        seq = sequence_id(json.loads(body[:n]).get("parameters"))
    except (ValueError, AttributeError, InvalidInput):
        return None
    return None if seq is None else f"oip:{name}:{seq}"


def request_key(arg: Any) -> str | None:
    """The session key of a request as Ray's HTTP proxy hands it to a replica (a pickled request)."""
    try:
        req = pickle.loads(arg) if isinstance(arg, bytes | bytearray) else arg
        scope = req._asgi_scope
        return session_key(scope.get("path", ""), scope.get("query_string", b""))
    except Exception:  # noqa: BLE001 - not an HTTP request: no key
        return None


class SessionRouter(ConsistentHashRouter):
    """``ConsistentHashRouter`` whose key is the session id named in the URL."""

    def _routing_key(self, pending_request: Any) -> str | None:
        if pending_request is not None and not pending_request.metadata.session_id and pending_request.args:
            key = request_key(pending_request.args[0])
            if key:
                return key
        return super()._routing_key(pending_request)
