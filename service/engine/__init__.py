"""The engine: session slots (``sessions``), the queue-and-future batcher (``batcher``), per-model
engines (``model_engine``) and the set of them with the engine thread (``engine``)."""
