"""Dynamic micro-batching: requests that arrive within a short window are processed together.

One worker per batcher takes the first waiting request, waits at most ``window_s`` for more
(up to ``max_batch``), and hands the whole batch to ``process`` in a worker thread: the
kernels run there with every core, and the event loop keeps accepting requests. A full queue
refuses new work at once (:class:`Overloaded`, answered 503 with Retry-After) instead of
growing without bound. A batch that fails is run again one request at a time, so that only the
request that caused the failure gets it: one bad request never fails the others of its batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("edgeplaid.serve")


class Overloaded(Exception):
    """The queue is full; the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int = 1) -> None:
        super().__init__("the server is at capacity, retry later")
        self.retry_after = retry_after


@dataclass
class _Job:
    item: Any
    future: asyncio.Future


class MicroBatcher:
    """Coalesces ``submit(item)`` calls into ``process(items) -> results`` calls.

    ``process`` runs in ``executor`` and returns one result per item, in order, or raises; a
    batch of several items that raises is processed again one item at a time, and only the
    items that fail alone get their exception (logged). ``on_batch(size)`` is told each
    batch's size (for metrics).
    """

    def __init__(
        self,
        process: Callable[[Sequence[Any]], Sequence[Any]],
        executor: Executor,
        window_s: float = 0.002,
        max_batch: int = 64,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.process = process
        self.executor = executor
        self.window_s = max(0.0, window_s)
        self.max_batch = max(1, max_batch)
        self.max_queue = max(1, max_queue)
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a batch)."""
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    async def submit(self, item: Any) -> Any:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded()
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(item, future))
        return await future

    async def _collect(self) -> list[_Job]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:  # whatever is already waiting joins at no cost
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            batch = [job for job in batch if not job.future.cancelled()]  # clients that left
            if not batch:
                continue
            try:
                if self.on_batch is not None:
                    self.on_batch(len(batch))
                await self._process(batch)
            except Exception as exc:  # the worker must outlive any one batch
                log.exception("batch failed outside processing")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    async def _process(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, self.process, [job.item for job in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"process returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            if len(batch) == 1:
                log.error("a request failed", exc_info=exc)
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
                return
            # Isolate the culprit: each request alone, so the innocent ones are answered.
            log.warning(
                "a batch of %d failed (%s: %s); retrying its requests one by one",
                len(batch),
                type(exc).__name__,
                exc,
            )
            for job in batch:
                if not job.future.cancelled():
                    await self._process([job])
            return
        for job, result in zip(batch, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)
