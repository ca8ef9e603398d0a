"""psn-stream on Ray Serve: N replicas, each the whole service (supervisor, engine core, front ends) on its
own CPU or device, sessions routed by id and shared through Redis (``docs/cluster.md``).

    PSN_STATE_URL=redis://127.0.0.1:6379/0 python -m service.ray     # PSN_RAY_REPLICAS=2 on PSN_PORT
    serve run service.ray:app_builder replicas=2                    # the same app, Serve's own CLI

It takes no arguments: every setting is a PSN_* environment variable (PSN_RAY_REPLICAS, PSN_RAY_REPLICA_CPUS,
PSN_STATE_URL, PSN_PORT, ...; docs/cluster.md; ``--help`` lists the service's).

Each Serve replica starts ``python -m service`` on a private port with ``PSN_CLUSTER=1`` and its Serve
replica tag as ``PSN_REPLICA_ID``, and relays HTTP requests and ``/v1/stream`` WebSockets to it. Ray's
proxy picks the replica with ``service.ray_router.SessionRouter`` (a consistent hash of the session id in
the URL, no fallback to other replicas: a session stays where it is). A replica that dies is replaced
by Serve; requests for its sessions reach another replica, which takes them over from Redis.
"""

# no `from __future__ import annotations`: FastAPI must see the real types through serve.ingress

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve._private.constants import SERVE_SESSION_ID
from ray.serve.config import RequestRouterConfig
from ray.serve.schema import LoggingConfig
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed
from yarl import URL

from service.config import BadSetting, SettingsError, check_argv, get_settings
from service.lifetime import die_with_parent
from service.ray_router import SessionRouter, oip_sequence_key

log = logging.getLogger("psn.ray")
ROOT = Path(__file__).resolve().parents[1]
HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length", "te", "trailer"}
api = FastAPI(title="psn-stream on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=4096,  # sessions queue in the engine core (it has its own bounds), not in Ray
    health_check_period_s=1,
    health_check_timeout_s=10,
    request_router_config=RequestRouterConfig(
        request_router_class=SessionRouter,
        request_router_kwargs={"num_fallback_replicas": 0},  # strict affinity: never another replica for a session
    ),
)
@serve.ingress(api)
class Replica:
    def __init__(self, env: dict[str, str] | None = None):
        self.replica_id = serve.get_replica_context().replica_tag
        self.port = free_port()
        self.env = {**os.environ, **(env or {}), "PSN_CLUSTER": "1", "PSN_REPLICA_ID": self.replica_id,
                    "PSN_HOST": "127.0.0.1", "PSN_PORT": str(self.port)}
        self.env.setdefault("PSN_WORKERS", "1")
        self.base = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=self.env,
                                     preexec_fn=lambda: die_with_parent(signal.SIGKILL))
        deadline = time.monotonic() + 180
        while True:  # ready before Serve routes anything here
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.replica_id}: the service exited with {self.proc.returncode}")
            try:
                if httpx.get(f"http://{self.base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {self.replica_id}: the service was not ready within 180 s")
            time.sleep(0.1)
        self.http: aiohttp.ClientSession | None = None  # made in the replica's event loop, on first use
        self.proxy: str | None = None  # Ray's HTTP proxy (host:port), for OIP sequences, learned on first use
        log.info("replica %s: the service (pid %d) serves on %s", self.replica_id, self.proc.pid, self.base)

    def check_health(self) -> None:
        """Serve replaces a replica whose service has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"replica {self.replica_id}: the service exited with {self.proc.returncode}")

    def __del__(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    @api.get("/ray/replica", include_in_schema=False)
    async def whoami(self) -> dict[str, Any]:
        """Which replica answered, and its processes (for scripts/cluster-smoke and debugging)."""
        return {"replica": self.replica_id, "pid": os.getpid(), "service_pid": self.proc.pid, "port": self.port}

    @api.websocket("/v1/stream")
    async def stream(self, ws: WebSocket) -> None:
        """Relay one WebSocket to the service, message for message, text and binary."""
        query = ws.scope.get("query_string", b"").decode("latin-1")
        url = f"ws://{self.base}/v1/stream" + (f"?{query}" if query else "")
        protocols = ws.scope.get("subprotocols") or None
        try:
            up = await ws_connect(url, subprotocols=protocols, max_size=None, compression=None, open_timeout=10)
        except Exception:  # noqa: BLE001 - the service is gone: the client reconnects (another replica)
            await ws.close(code=1013)
            return
        await ws.accept(subprotocol=up.subprotocol)

        async def down() -> None:  # service -> client
            async for msg in up:
                if isinstance(msg, str):
                    await ws.send_text(msg)
                else:
                    await ws.send_bytes(msg)

        task = asyncio.get_running_loop().create_task(down())
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                await up.send(msg["text"] if msg.get("text") is not None else msg.get("bytes") or b"")
        except (WebSocketDisconnect, ConnectionClosed, RuntimeError):
            pass
        finally:
            task.cancel()
            await up.close()
            try:
                await ws.close()
            except RuntimeError:
                pass

    @api.post("/v2/models/{name}/infer")
    async def oip_infer(self, request: Request, name: str) -> Response:
        """An OIP v2 infer request: a sequence's (its id is in the body, out of the proxy's sight) goes on
        to the replica its key hashes to, through Ray's proxy again (``_hand_on``); any other is served here."""
        raw, query, headers, body = await self._incoming(request, f"v2/models/{name}/infer")
        routed = request.headers.get(SERVE_SESSION_ID)  # the proxy has keyed it on that already
        key = None if routed else oip_sequence_key(name, body, request.headers.get("inference-header-content-length"))
        if key is None:
            status, out, content = await self.forward(request.method, raw, query, headers, body)
        else:
            try:
                status, out, content = await self._hand_on(key, request.method, raw, query, headers, body)
            except Exception as e:  # noqa: BLE001 - Serve's proxy address not learned (``forward`` answers the
                # proxy's own failures 503): retry, not 500
                log.warning("replica %s: OIP sequence %s not handed on: %r", self.replica_id, key, e)
                return JSONResponse({"error": f"the replica serving {key} is not reachable ({type(e).__name__}); "
                                     "send the request again"}, status_code=503, headers={"Retry-After": "1"})
        return Response(content, status_code=status, headers=out)

    async def _hand_on(self, key: str, method: str, raw: bytes, query: bytes, headers: list[tuple[str, str]],
                       body: bytes) -> tuple[int, dict[str, str], bytes]:
        """The request once more through Ray's HTTP proxy, now keyed ``key`` in the session header, so the
        proxy's router sends it to the replica ``key`` hashes to, which serves it (``oip_infer``). Not
        a deployment handle: handle calls made from a replica in the first seconds after Serve started
        were seen here (about 1 in 10 starts) to run on their replica and not report back within 30 s (a
        retry after 3 s applied the steps twice); requests the proxy routes never did."""
        if self.proxy is None:
            from ray.serve.context import _get_global_client

            cfg = (await asyncio.to_thread(_get_global_client)).http_config  # once: a blocking call to Serve
            host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "", None) else cfg.host
            self.proxy = f"{host}:{cfg.port}"
        return await self.forward(method, raw, query, [*headers, (SERVE_SESSION_ID, key)], body, to=self.proxy)

    @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def relay(self, request: Request, path: str) -> Response:
        """Relay one HTTP request to the service."""
        status, out, content = await self.forward(request.method, *await self._incoming(request, path))
        return Response(content, status_code=status, headers=out)

    @staticmethod
    async def _incoming(request: Request, path: str) -> tuple[bytes, bytes, list[tuple[str, str]], bytes]:
        """What ``forward`` sends on, as received: the raw path and query, the end-to-end headers, the body."""
        raw = request.scope.get("raw_path") or ("/" + path).encode()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
        return raw, request.scope.get("query_string", b""), headers, await request.body()

    async def forward(self, method: str, raw: bytes, query: bytes, headers: list[tuple[str, str]],
                      body: bytes, to: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request to this replica's service: status, headers, body (aiohttp, which Serve depends on:
        httpx's connection pool cost the replica more CPU per request than the service's whole answer,
        bench/cluster.py); ``to``: another address (Ray's proxy, ``_hand_on``)."""
        if self.http is None:
            self.http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1024, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=60), auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        url = URL(f"http://{to or self.base}{raw.decode('latin-1')}" + (f"?{query.decode('latin-1')}" if query else ""),
                  encoded=True)
        try:
            async with self.http.request(method, url, data=body, headers=headers, allow_redirects=False) as r:
                content = await r.read()
                out = {k: v for k, v in r.headers.items() if k.lower() not in HOP | {"content-encoding"}}
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as e:
            message = f"replica {self.replica_id}: {type(e).__name__}; send the request again"
            error = message if raw.startswith(b"/v2/") else {"code": "engine_unavailable", "message": message}
            return 503, {"content-type": "application/json", "retry-after": "1"}, json.dumps({"error": error}).encode()
        out.setdefault("x-psn-replica", self.replica_id)  # handed on (``to``): the replica that served it
        return status, out, content


def env_number(name: str, default: str, kind: type[int] | type[float]) -> Any:
    """A positive number from the environment variable ``name``; a BadSetting naming it otherwise."""
    return positive(name, os.environ.get(name, default), kind)


def positive(name: str, text: str, kind: type[int] | type[float]) -> Any:
    """``text`` as a finite ``kind`` > 0; a BadSetting naming ``name`` otherwise."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value > 0 or value == float("inf"):
        what = "a whole number" if kind is int else "a number"
        raise BadSetting(f"{name}: expected {what} > 0, got {text!r}")
    return value


def build(env: dict[str, str] | None = None, replicas: int | None = None) -> Any:
    """The Serve application: ``replicas`` (default ``PSN_RAY_REPLICAS``) replicas of the service."""
    settings = get_settings()
    n = replicas or env_number("PSN_RAY_REPLICAS", "2", int)
    cpus = env_number("PSN_RAY_REPLICA_CPUS", "1", float)
    passed = {k: v for k, v in os.environ.items() if k.startswith("PSN_")} | (env or {})
    if not (passed.get("PSN_STATE_URL") or settings.state_url):
        raise SystemExit("service.ray: set PSN_STATE_URL=redis://HOST:PORT/DB (the sessions replicas share)")
    return Replica.options(num_replicas=n, ray_actor_options={"num_cpus": cpus},
                           logging_config=serve_logging(settings.log_level)).bind(passed)


def serve_logging(level: str) -> LoggingConfig:
    """Serve's own logs at ``PSN_LOG_LEVEL`` (at least WARNING), its access log only at debug: a line per
    request in each replica and the proxy, streamed to the driver, which cost more CPU per request than
    the service's own work (bench/cluster.py)."""
    debug = level.lower() == "debug"
    return LoggingConfig(enable_access_log=debug, log_level="DEBUG" if debug else
                         max(level.upper(), "WARNING", key=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL").index))


def app_builder(args: dict[str, str]) -> Any:
    """``serve run service.ray:app_builder [replicas=N]``: the app for Serve's CLI and config files."""
    return build(replicas=positive("replicas", args["replicas"], int) if "replicas" in args else None)


def main() -> None:
    check_argv(sys.argv[1:], "python -m service.ray", "Run PSN_RAY_REPLICAS replicas of the service on Ray Serve "
               "(PSN_RAY_REPLICA_CPUS CPUs each), sessions shared through PSN_STATE_URL (docs/cluster.md).")
    import ray

    try:
        settings = get_settings()
        application = build()
    except SettingsError as e:  # names each bad variable (a bad key by its position, never its value)
        raise e.exit("service.ray") from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    serve.start(http_options={"host": settings.host, "port": settings.port},
                logging_config=serve_logging(settings.log_level))
    serve.run(application, name="psn", route_prefix="/")
    log.info("psn-stream on Ray Serve: %s replicas on %s:%d", env_number("PSN_RAY_REPLICAS", "2", int),
             settings.host, settings.port)
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    while not stopping:
        time.sleep(0.2)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
