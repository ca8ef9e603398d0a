"""Entry point of one front-end process: uvicorn serving the front-end app on the shared listening socket."""

from __future__ import annotations

import logging
import socket

import uvicorn

from service.config import Settings
from service.frontend.app import create_app


def run_frontend(settings: Settings, engine_address: str, sock: socket.socket, worker: int) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s [front end {worker} %(process)d] %(message)s")
    try:
        import uvloop  # noqa: F401 - uvicorn picks it up by itself when installed
    except ImportError:
        pass
    config = uvicorn.Config(create_app(settings, engine_address, worker), log_level=settings.log_level,
                            ws_max_size=max(16 * 1024 * 1024, 2 * settings.max_request_bytes),
                            timeout_graceful_shutdown=30, ws_per_message_deflate=settings.ws_compression)
    uvicorn.Server(config).run(sockets=[sock])
