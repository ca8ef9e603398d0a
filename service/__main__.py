"""``python -m service``: serve every model under PSN_MODEL_DIR on PSN_HOST:PSN_PORT."""

from __future__ import annotations

import logging

import uvicorn

from service.config import get_settings
from service.main import create_app


def main() -> None:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                ws_max_size=max(16 * 1024 * 1024, 2 * settings.max_request_bytes), timeout_graceful_shutdown=30,
                ws_per_message_deflate=settings.ws_compression)


if __name__ == "__main__":
    main()
