"""Queue-and-future batcher: requests wait on futures, one consumer task runs them in batches.

Each request puts a ``WorkItem`` (slot, L steps) and awaits its future. The consumer takes what is
pending (at most ``max_batch_size``; if the oldest item is younger than ``max_wait`` and the batch
is not full, it waits for more until then), runs the whole batch in the engine thread, and resolves
the futures in the order the items arrived. Items with different L run as one backend call per L.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from service.engine.inline import InlineExecutor
from service.errors import QueueFull, ShuttingDown


@dataclass(eq=False)
class WorkItem:
    slot: int
    x: Tensor  # (L, *input_shape)
    future: asyncio.Future
    enqueued: float  # time.monotonic()
    on_done: Callable[[Any], None] | None = None  # runs on the loop before the future resolves


class Batcher:
    def __init__(self, name: str, execute: Callable[[Sequence[WorkItem]], list[Any]], executor: Executor, *,
                 max_batch_size: int, max_wait_s: float, queue_depth: int,
                 observe: Callable[[int, float], None] | None = None):
        self.name, self._execute, self._executor = name, execute, executor
        self.max_batch_size, self.max_wait_s, self.queue_depth = max_batch_size, max_wait_s, queue_depth
        self._observe = observe  # (batch size, seconds the batch took) -> metrics
        self._items: deque[WorkItem] = deque()
        self._wake = asyncio.Event()  # set when the queue becomes non-empty
        self._full = asyncio.Event()  # set when a full batch is pending
        self._task: asyncio.Task | None = None
        self._closing = False
        self._batch: list[WorkItem] = []  # the batch being computed
        self.running = 0  # items in the batch being computed

    @property
    def depth(self) -> int:
        return len(self._items)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    def submit(self, slot: int, x: Tensor, on_done: Callable[[Any], None] | None = None) -> asyncio.Future:
        """Queue L steps for ``slot``; the future gets what ``execute`` returned for this item."""
        if self._closing:
            raise ShuttingDown("the service is shutting down; retry on another replica", retry_after=1)
        if len(self._items) >= self.queue_depth:
            raise QueueFull(f"model {self.name!r}: {self.queue_depth} requests are already queued; retry shortly",
                            retry_after=1)
        fut = asyncio.get_running_loop().create_future()
        self._items.append(WorkItem(slot, x, fut, time.monotonic(), on_done))
        self._wake.set()
        if len(self._items) >= self.max_batch_size:
            self._full.set()
        return fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._items:
                self._wake.clear()
                await self._wake.wait()
            if len(self._items) < self.max_batch_size and self.max_wait_s > 0:
                remaining = self._items[0].enqueued + self.max_wait_s - time.monotonic()
                if remaining > 0:
                    self._full.clear()
                    try:
                        await asyncio.wait_for(self._full.wait(), remaining)
                    except TimeoutError:
                        pass
            n = min(len(self._items), self.max_batch_size)
            batch = self._batch = [self._items.popleft() for _ in range(n)]
            if len(self._items) < self.max_batch_size:
                self._full.clear()
            self.running = n
            t0 = time.perf_counter()
            try:
                if isinstance(self._executor, InlineExecutor):  # CPU: run now, no hop through the loop
                    results = self._execute(batch)
                else:
                    results = await loop.run_in_executor(self._executor, self._execute, batch)
            except Exception as e:  # a backend failure fails this batch only; the loop keeps serving
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            finally:
                self.running = 0
            if self._observe is not None:
                self._observe(n, time.perf_counter() - t0)
            for item, res in zip(batch, results, strict=True):
                if item.on_done is not None:
                    item.on_done(res)
                if not item.future.done():
                    item.future.set_result(res)

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work, let queued work finish (up to ``timeout_s``), then refuse what is left."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        while (self._items or self.running) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for item in [*self._batch, *self._items]:
            if not item.future.done():
                item.future.set_exception(ShuttingDown("the service shut down before this request ran",
                                                       retry_after=1))
        self._items.clear()
