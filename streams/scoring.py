"""Scoring a batch without holding up the loop. On CUDA the detector's own asynchronous submit;
on the CPU one of three modes (stream.cpu_scoring): a child process (the default; see
streams.score_process), a one-thread executor, or inline in the loop."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np

from detector import Detector, PendingScores, Scores
from streams.metrics import WorkerMetrics
from streams.score_process import (
    PendingProcessScores,
    ScoringProcess,
    ScoringProcessDiedError,
    ScoringProcessError,
)

logger = logging.getLogger(__name__)

CpuScoring = Literal["process", "thread", "inline"]


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


class _ProcessScoring:
    """A batch in the scoring process. If the process died, it is restarted and the batch
    scored again there; only a batch that fails twice raises (and goes to the DLQ)."""

    def __init__(self, process: ScoringProcess, scorer: BatchScorer, images: np.ndarray) -> None:
        self._scorer = scorer
        self._images = images
        self._pending: PendingProcessScores | None = None
        try:
            self._pending = process.submit(images)
        except ScoringProcessError as exc:  # it failed to start: finish() restarts it
            logger.error("%s", exc)
        self._scores: Scores | None = None

    def done(self) -> bool:
        return self._scores is not None or self._pending is None or self._pending.done()

    def result(self) -> Scores:
        if self._scores is None:
            self._scores = self._scorer.finish(self._pending, self._images)
        return self._scores


Scoring = Future[Scores] | _CudaScoring | _DoneScoring | _ProcessScoring


class BatchScorer:
    """Starts scoring a batch and returns a handle with done() and result()."""

    def __init__(
        self,
        *,
        detector: Detector,
        metrics: WorkerMetrics,
        cpu_scoring: CpuScoring,
        capacity: int,
        cpu_threads: int,
    ) -> None:
        self._detector = detector
        self._metrics = metrics
        self._cuda = detector.device.type == "cuda"
        mode = "cuda" if self._cuda else cpu_scoring
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
            if mode == "thread"
            else None
        )
        self.process = (
            ScoringProcess(model=detector.model, capacity=capacity, cpu_threads=cpu_threads)
            if mode == "process"
            else None
        )
        self.mode = mode

    def ready(self) -> bool:
        """Whether batches can be scored now (the scoring process has loaded the model)."""
        return self.process is None or self.process.ready()

    def _score(self, images: np.ndarray) -> Scores:
        started = time.perf_counter()
        scores = self._detector.submit(images).result()
        self._metrics.inference_seconds.observe(time.perf_counter() - started)
        return scores

    def submit(self, images: np.ndarray, *, caught_up: bool = False) -> Scoring:
        """Start scoring `images`. `caught_up`: the batch was cut by its deadline, so the
        worker is not short of CPU; the scoring process is then bypassed and the batch scored
        here at once, which spares it the hand-over and the child's wake-up (on a busy
        machine, p99 latency at 5,000 records/s was 140-160 ms inline against 190-240 ms
        through the child; BENCHMARKS.md). Full batches (a backlog) go to the child."""
        if self._cuda:
            started = time.perf_counter()
            return _CudaScoring(self._detector.submit(images), started, self._metrics)
        if self.process is not None and not caught_up:
            return _ProcessScoring(self.process, self, images)
        if self._executor is None:
            return _DoneScoring(self._score(images))
        return self._executor.submit(self._score, images)

    def finish(self, pending: PendingProcessScores | None, images: np.ndarray) -> Scores:
        """Raw scores from the process, judged against the calibration. When the process died
        (or never started) it is restarted and the batch scored again in the new one, so a
        crash loses nothing and dead-letters nothing. An error the process reports for the
        batch itself, or a second failure, raises: the worker dead-letters that batch."""
        process = self.process
        assert process is not None
        try:
            if pending is None:
                raise ScoringProcessDiedError("scoring process did not start")
            raw, seconds = pending.result()
        except ScoringProcessDiedError as exc:
            if pending is None or pending.generation == process.generation:
                self._metrics.errors.labels(kind="scoring").inc()
                logger.error("%s; restarting it and scoring the batch there", exc)
                process.restart()
            raw, seconds = process.submit(images).result()
        self._metrics.inference_seconds.observe(seconds)
        return Scores.judged(raw, self._detector.calibration)

    @property
    def overlaps(self) -> bool:
        """Whether submit() returns before the scores are ready (so polling can overlap)."""
        return self.mode != "inline"

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self.process is not None:
            self.process.close()
