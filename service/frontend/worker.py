"""Entry point of one front-end process: uvicorn serving the front-end app on the shared listening socket."""

from __future__ import annotations

import logging
import socket

import uvicorn

from service import logs
from service.config import Settings
from service.frontend.app import create_app
from service.frontend.gate import FastRefusal
from service.frontend.limits import SlowReaders
from service.frontend.protocols import InvalidUtf8, http_protocol, ws_protocol
from service.lifetime import die_with_parent, spawned_by


def ws_max_size(max_request_bytes: int) -> int:
    """uvicorn's WebSocket message limit. A message over PSN_MAX_REQUEST_BYTES but under this one is read
    (reassembled and decoded, never parsed) and answered request_too_large, and the connection stays; a
    longer one is refused from its frame header (close 1009), before any of it is buffered. (Reading a
    14 MB message, as under the old 16 MiB limit, measured 45 ms of the front end's loop, mostly unmasking
    in websockets: time every other connection of that front end waits.)"""
    return max(4 << 20, 2 * max_request_bytes)


def run_frontend(settings: Settings, engine_address: str, sock: socket.socket, worker: int) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s [front end {worker} %(process)d] %(message)s")
    die_with_parent(parent=spawned_by())  # no engine core or front end outlives a supervisor killed with SIGKILL
    try:
        import uvloop  # noqa: F401 - uvicorn picks it up by itself when installed
    except ImportError:
        pass
    fastapi_app = create_app(settings, engine_address, worker)
    count = fastapi_app.state.metrics.error  # psn_errors_total: refusals made before the app runs count too
    http = (http_protocol(settings.max_header_bytes, FastRefusal(fastapi_app, settings).answer, settings.read_timeout_s,
                          count) or "h11")
    app = SlowReaders(fastapi_app, settings.ws_send_timeout_s)
    config = uvicorn.Config(app, log_level=settings.log_level, ws=ws_protocol(count, settings.read_timeout_s),
                            ws_max_size=ws_max_size(settings.max_request_bytes), http=http,
                            h11_max_incomplete_event_size=settings.max_header_bytes,
                            timeout_graceful_shutdown=30, ws_per_message_deflate=settings.ws_compression)
    logs.install("uvicorn", "uvicorn.access", "uvicorn.error")  # uvicorn.Config has set up its handlers by now
    logging.getLogger("uvicorn.error").addFilter(InvalidUtf8())
    server = uvicorn.Server(config)
    fastapi_app.state.server = server  # the start-up's wait for the engine core ends when a stop is asked
    server.run(sockets=[sock])
