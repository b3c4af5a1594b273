"""Adaptive micro-batching of concurrent requests onto one device.

Requests put their images on a queue and wait. One loop takes the first waiting request, then
keeps taking more until the batch holds `max_batch_size` images or the first request has waited
`max_batch_delay_s`, runs the batch in the device thread, and hands every request its rows. Under
light load a request waits at most the delay; under heavy load batches fill while the previous
one runs, so the device sees large batches (the size cap and wait cap of Triton's and BentoML's
adaptive batchers). The queue is bounded in images: beyond `max_queue_images` a request is turned
away at once (QueueFullError -> 503 with Retry-After) instead of growing memory without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

Result = TypeVar("Result")


class QueueFullError(Exception):
    """The batcher's queue holds as many images as it may; the caller should retry later."""


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[Result]):
    """`run_batch(images N x 784) -> list of per-image results` runs on `executor` (one thread
    for the device), one batch at a time."""

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], list[Result]],
        *,
        executor: Executor,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue_images: int,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue_images = max_queue_images
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self.queued_images = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(QueueFullError("the service is stopping"))
        self._queue.clear()
        self.queued_images = 0

    async def submit(self, images: np.ndarray) -> list[Result]:
        """Queue the images (N x 784 uint8) and wait for their results, in order."""
        n = len(images)
        if self.queued_images + n > self.max_queue_images or not self.running:
            raise QueueFullError(
                f"{self.queued_images} images are waiting to be scored (at most "
                f"{self.max_queue_images}); try again shortly"
            )
        pending = _Pending(images, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self.queued_images += n
        assert self._wakeup is not None
        self._wakeup.set()
        return await pending.future

    def _take(self) -> list[_Pending]:
        """Requests for one batch: always the first; then more while they fit the size cap."""
        batch = [self._queue.popleft()]
        size = len(batch[0].images)
        while self._queue and size + len(self._queue[0].images) <= self.max_batch_size:
            pending = self._queue.popleft()
            batch.append(pending)
            size += len(pending.images)
        self.queued_images -= size
        return batch

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait cap: the first request may wait for company until its deadline, unless the
            # batch is full already.
            deadline = self._queue[0].enqueued + self.max_batch_delay_s
            while (
                sum(len(p.images) for p in self._queue) < self.max_batch_size
                and (remaining := deadline - time.monotonic()) > 0
            ):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [p for p in self._take() if not p.future.cancelled()]
            if not batch:
                continue
            images = (
                np.concatenate([p.images for p in batch]) if len(batch) > 1 else batch[0].images
            )
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, images)
            except Exception as exc:
                logger.exception("a batch of %d images failed", len(images))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(len(images), time.monotonic() - started)
            start = 0
            for pending in batch:
                end = start + len(pending.images)
                if not pending.future.done():
                    pending.future.set_result(results[start:end])
                start = end
