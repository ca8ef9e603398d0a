"""psn-stream service: FastAPI app, batching engine and backends for streaming PSN inference."""
