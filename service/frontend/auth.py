"""Access control and browser safety in front of every route: API keys, the Origin policy, and CORS.

- **Keys** (on when PSN_API_KEYS or PSN_API_KEYS_FILE holds any): ``Authorization: Bearer <key>`` on
  HTTP and on the WebSocket handshake; browsers, which cannot set headers on a WebSocket, offer
  ``psn.key.<key>`` as one of its subprotocols next to a real one (``psn.json.v1`` or
  ``psn.binary.v1``), and the server only ever selects the real one. A key is hashed (SHA-256) and
  compared with every configured hash in constant time; the request then carries the key's
  ``owner`` id (``scope["psn.owner"]``), which the engine core uses for session ownership and
  per-key limits. Without a valid key: 401 ``unauthorized`` (a WebSocket handshake too), except on
  the public paths below.
- **Origin**: a request that carries an ``Origin`` (browsers do on WebSocket handshakes and on
  cross-origin requests) is refused with 403 ``origin_not_allowed`` unless the origin is the
  server's own (it matches ``Host``), or listed in PSN_ALLOWED_ORIGINS (``*``: any). Clients that
  send no Origin (curl, SDKs) are never refused for it.
- **Host**: with PSN_ALLOWED_HOSTS, or when the service listens on a loopback address only (the default
  127.0.0.1), a request whose ``Host`` names another host is refused with 403 ``host_not_allowed``
  (loopback names are always allowed): a page of ``evil.example`` whose name is made to resolve to
  127.0.0.1 (DNS rebinding) is same-origin with itself, so the Origin check alone lets it in.
- **Connections per key** (PSN_KEY_MAX_CONNECTIONS, ``KeyConnectionLimit``): the WebSockets one key may hold
  open at once on this front-end process; past it the handshake is refused 429, never accepted.
- **CORS** for the listed origins (``add_cors``): preflights are answered, responses say which
  headers a page may read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from service.config import Settings, key_hash, loopback_name
from service.errors import HostNotAllowed, OriginNotAllowed, ServiceError, TooManyKeyConnections, Unauthorized
from service.frontend.limits import OWNER, count_error, send_json_error

KEY_SUBPROTOCOL = "psn.key."  # a WebSocket subprotocol entry that carries the key (browsers)
JSON_SUBPROTOCOL = "psn.json.v1"  # JSON frames (the default), for browsers that must name a subprotocol
# No key needed: probes, the demo page's own files (its API calls need one) and the API's documentation.
# /metrics needs a key (Prometheus sends one with `authorization` in its scrape config).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/demo", "/docs",
                          "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PREFIXES = ("/demo/static/",)


def owner_id(h: bytes) -> str:
    """The owner id of the key with hash ``h``: short, stable across restarts and workers, not the hash."""
    return hashlib.sha256(b"psn-owner:" + h).hexdigest()[:16]


class KeyRing:
    """The configured keys, as hashes only."""

    def __init__(self, hashes: tuple[bytes, ...]):
        self.hashes = hashes
        self.owners = {h: owner_id(h) for h in hashes}

    def owner(self, key: str) -> str | None:
        """The owner id of ``key``, or None if it is not a configured key."""
        h, found = key_hash(key), None
        for stored in self.hashes:  # all of them, no early exit: the time does not depend on which one matched
            if hmac.compare_digest(h, stored):
                found = stored
        return None if found is None else self.owners[found]


def bearer_key(authorization: bytes) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header's value (None for another scheme)."""
    scheme, _, key = authorization.decode("latin-1").strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


def presented_key(scope: Scope, authorization: bytes | None) -> str | None:
    """The key a request presents: ``Authorization: Bearer <key>``, or (WebSocket) a ``psn.key.<key>``
    subprotocol entry."""
    if authorization is not None:
        return bearer_key(authorization)
    if scope["type"] == "websocket":
        for p in scope.get("subprotocols", ()):
            if p.startswith(KEY_SUBPROTOCOL):
                return p[len(KEY_SUBPROTOCOL):]
    return None


async def refuse(scope: Scope, receive: Receive, send: Send, err: ServiceError,
                 extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """Answer ``err`` before the app sees the request: JSON over HTTP (OIP's ``{"error": msg}`` under /v2),
    and as the HTTP answer to a WebSocket handshake (the connection is never accepted)."""
    count_error(scope, err)
    data = json.dumps(err.body_for(scope["path"]) if scope["type"] == "http" else err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra,
               *((k.lower().encode(), v.encode()) for k, v in err.headers().items())]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
        return
    if (await receive())["type"] != "websocket.connect":
        return
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send({"type": "websocket.http.response.start", "status": err.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": data})
    else:  # a server without the ASGI denial-response extension answers 403
        await send({"type": "websocket.close", "code": 1008})


class AccessControl:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.keys = KeyRing(settings.key_hashes) if settings.key_hashes else None
        self.any_origin = "*" in settings.origins
        self.origins = frozenset(settings.origins)
        hosts = settings.hosts
        self.hosts = None if hosts is None else frozenset(hosts)

    def host_allowed(self, host: bytes) -> bool:
        """Whether the ``Host`` header's name (its port aside) is loopback or in PSN_ALLOWED_HOSTS."""
        h = host.decode("latin-1").strip().lower()
        name = h[1:h.find("]")] if h.startswith("[") and "]" in h else h.rpartition(":")[0] if ":" in h else h
        name = name.rstrip(".")
        return loopback_name(name) or (self.hosts is not None and name in self.hosts)

    def origin_allowed(self, origin: bytes, host: bytes | None) -> bool:
        o = origin.decode("latin-1").strip().rstrip("/").lower()
        if self.any_origin or o in self.origins:
            return True
        _, sep, netloc = o.partition("://")  # the server's own origin: scheme://Host
        return bool(sep) and host is not None and netloc == host.decode("latin-1").strip().lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        origin = host = authorization = None
        origins = hosts = authorizations = 0
        for name, value in scope["headers"]:
            if name == b"origin":
                origin, origins = value, origins + 1
            elif name == b"host":
                host, hosts = value, hosts + 1
            elif name == b"authorization":
                authorization, authorizations = value, authorizations + 1
        # two of any: which one counts would be a guess (an Authorization only matters with keys on)
        twice = "Origin" if origins > 1 else "Host" if hosts > 1 else \
            "Authorization" if authorizations > 1 and self.keys is not None else ""
        if twice:
            return await refuse(scope, receive, send, ServiceError(
                f"{twice}: the request sends more than one {twice} header; send one", field=twice))
        if self.hosts is not None and host is not None and not self.host_allowed(host):
            return await refuse(scope, receive, send, HostNotAllowed(
                f"Host: {host.decode('latin-1')!r} is not a name of this server (it answers to loopback names"
                f"{' and PSN_ALLOWED_HOSTS' if self.hosts else ' only, as it listens on loopback'}; a proxy that "
                "passes its own Host on, or another name of this machine, goes in PSN_ALLOWED_HOSTS)", field="Host"))
        if origin is not None and not self.origin_allowed(origin, host):
            err = OriginNotAllowed(f"Origin: {origin.decode('latin-1')!r} may not use this API (PSN_ALLOWED_ORIGINS)",
                                   field="Origin")
            return await refuse(scope, receive, send, err)
        path = scope["path"]
        if self.keys is None or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            scope[OWNER] = ""
            return await self.app(scope, receive, send)
        key = presented_key(scope, authorization)
        owner = self.keys.owner(key) if key else None
        if owner is None:
            how = ("Authorization: Bearer <key>" if scope["type"] == "http" else
                   f"Authorization: Bearer <key>, or the subprotocol {KEY_SUBPROTOCOL}<key>")
            err = Unauthorized("API key: not one of this server's keys" if key else
                               f"API key: this server needs one; send {how}", field="Authorization")
            return await refuse(scope, receive, send, err, ((b"www-authenticate", b"Bearer"),))
        scope[OWNER] = owner
        await self.app(scope, receive, send)


class KeyConnectionLimit:
    """At most ``cap`` WebSockets open at once per API key on this front-end process (PSN_KEY_MAX_CONNECTIONS;
    the front ends do not share counts), so one key cannot take every PSN_MAX_CONNECTIONS place. Sits inside
    AccessControl, which sets the owner, and outside ConnectionLimit: a handshake past the cap is refused
    before it is accepted and takes no place there. Added only with keys and a cap (``app.py``)."""

    def __init__(self, app: ASGIApp, cap: int):
        self.app, self.cap = app, cap
        self.held: dict[str, int] = {}  # owner -> its WebSockets open here; an owner with none has no entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        owner = scope.get(OWNER) if scope["type"] == "websocket" else None
        if not owner:  # HTTP, or a public path (no key asked for)
            return await self.app(scope, receive, send)
        n = self.held.get(owner, 0)
        if n >= self.cap:
            return await refuse(scope, receive, send, TooManyKeyConnections(
                f"this API key already holds {n} WebSocket connections to this front-end process "
                f"(PSN_KEY_MAX_CONNECTIONS={self.cap}, counted per process); close one, or retry shortly",
                retry_after=1))
        self.held[owner] = n + 1
        try:
            await self.app(scope, receive, send)
        finally:  # however the connection ended: closed by either side, dropped, timed out, refused after accept
            n = self.held[owner] - 1
            if n:
                self.held[owner] = n
            else:
                del self.held[owner]


# what a refused preflight asked for that is not allowed (Starlette's word) -> the request header that asked
PREFLIGHT_FIELDS = {"origin": "Origin", "method": "Access-Control-Request-Method",
                    "headers": "Access-Control-Request-Headers",
                    "private-network": "Access-Control-Request-Private-Network"}


class PreflightRefusal:
    """A refused CORS preflight answered in the API's shape (``/v2``: the protocol's) and counted, with the
    CORS headers Starlette gave it, instead of Starlette's plain-text 'Disallowed CORS method'."""

    def __init__(self, err: ServiceError, headers: list[tuple[bytes, bytes]]):
        self.err, self.headers = err, headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json_error(scope, send, self.err, self.headers)


class Cors(CORSMiddleware):
    def preflight_response(self, request_headers: Any) -> Any:
        r = super().preflight_response(request_headers)
        if r.status_code != 400:
            return r
        failures = bytes(r.body).decode().removeprefix("Disallowed CORS ").split(", ")
        asked = [PREFLIGHT_FIELDS.get(f, f) for f in failures]
        if "Origin" in asked:
            err: ServiceError = OriginNotAllowed(f"Origin: {request_headers['origin']!r} may not use this API "
                                                 "(PSN_ALLOWED_ORIGINS)", field="Origin")
        else:
            err = ServiceError(f"{asked[0]}: not allowed here (methods {', '.join(sorted(self.allow_methods))}; "
                               f"headers {', '.join(sorted(self.allow_headers))})", field=asked[0])
        keep = [(k, v) for k, v in r.raw_headers if k not in (b"content-type", b"content-length")]
        return PreflightRefusal(err, keep)


def add_cors(app: FastAPI, settings: Settings) -> None:
    """CORS for PSN_ALLOWED_ORIGINS (nothing to add without a list: a same-origin page needs none). Add it
    outside AccessControl, so a preflight (which carries no key) is answered and refusals carry CORS headers."""
    if not settings.origins:
        return
    app.add_middleware(Cors, allow_origins=list(settings.origins), allow_methods=["GET", "POST", "DELETE"],
                       allow_headers=["authorization", "content-type", "inference-header-content-length"],
                       expose_headers=["retry-after", "inference-header-content-length", "x-psn-worker"],
                       max_age=600)
