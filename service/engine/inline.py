"""An executor that runs each call at once in the caller's thread (the event loop)."""

from __future__ import annotations

from concurrent.futures import Executor, Future


class InlineExecutor(Executor):
    def submit(self, fn, /, *args, **kwargs) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            fut.set_exception(e)
        return fut
