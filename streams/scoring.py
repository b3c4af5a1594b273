"""Scoring a batch without holding up the loop: synchronously on the CPU (default), in a
one-thread executor on the CPU (stream.cpu_scoring_thread), or asynchronously on CUDA."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from detector import Detector, PendingScores, Scores
from streams.metrics import WorkerMetrics


class _CudaScoring:
    """A batch on the GPU: publishing waits only for the copy back of its scores."""

    def __init__(self, pending: PendingScores, started: float, metrics: WorkerMetrics) -> None:
        self._pending = pending
        self._started = started
        self._metrics = metrics
        self._scores: Scores | None = None

    def done(self) -> bool:
        # The loop keeps polling until the GPU has finished instead of blocking on it.
        return self._pending.done()

    def result(self) -> Scores:
        if self._scores is None:
            self._scores = self._pending.result()
            self._metrics.inference_seconds.observe(time.perf_counter() - self._started)
        return self._scores


class _DoneScoring:
    """A batch scored synchronously on the CPU."""

    def __init__(self, scores: Scores) -> None:
        self._scores = scores

    def done(self) -> bool:
        return True

    def result(self) -> Scores:
        return self._scores


Scoring = Future[Scores] | _CudaScoring | _DoneScoring


class BatchScorer:
    """Starts scoring and returns at once: a one-thread executor on the CPU (torch releases the
    GIL, so the main thread polls meanwhile), the detector's own asynchronous submit on CUDA."""

    def __init__(self, *, detector: Detector, metrics: WorkerMetrics, threaded: bool) -> None:
        self._detector = detector
        self._metrics = metrics
        self._cuda = detector.device.type == "cuda"
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
            if threaded and not self._cuda
            else None
        )

    def _score(self, images: np.ndarray) -> Scores:
        started = time.perf_counter()
        scores = self._detector.submit(images).result()
        self._metrics.inference_seconds.observe(time.perf_counter() - started)
        return scores

    def submit(self, images: np.ndarray) -> Scoring:
        if self._cuda:
            started = time.perf_counter()
            return _CudaScoring(self._detector.submit(images), started, self._metrics)
        if self._executor is None:
            return _DoneScoring(self._score(images))
        return self._executor.submit(self._score, images)

    @property
    def overlaps(self) -> bool:
        """Whether submit() returns before the scores are ready (so polling can overlap)."""
        return self._cuda or self._executor is not None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
