"""The one scoring seam: `submit(images)` starts scoring a batch and returns a `PendingBatch`
whose `done()` says whether `result()` would return at once.

- `DeviceScorer` scores on the detector's device: asynchronously on CUDA, at once on the CPU.
- `ProcessScorer` scores on the CPU in a child process (streams.worker.score_process), so that torch
  and kafka-python's threads do not share one GIL. It owns its rules: a batch cut by its
  deadline (the worker has caught up) is scored here at once instead, sparing it the hand-over
  (BENCHMARKS.md); a child that dies or does not answer within `timeout_s` is restarted and the
  batch scored again there; only a batch that fails twice raises (the worker dead-letters it).

`build_scorer` is the one place that decides which one a worker gets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from detector import Detector, PendingScores, Scores
from streams.config import StreamConfig
from streams.worker.score_process import (
    PendingProcessScores,
    ScoringProcess,
    ScoringProcessDiedError,
    ScoringProcessError,
)

logger = logging.getLogger(__name__)


class PendingBatch(Protocol):
    """A batch being scored. `seconds`: time spent scoring it, known once `result()` returned."""

    seconds: float

    def done(self) -> bool: ...

    def result(self) -> Scores: ...


class Scorer(Protocol):
    overlaps: bool  # submit() returns before the scores are ready (the loop can poll meanwhile)
    description: str

    def submit(self, images: np.ndarray, *, caught_up: bool = False) -> PendingBatch: ...

    def ready(self) -> bool: ...

    def close(self) -> None: ...


class _DevicePending:
    def __init__(self, pending: PendingScores, started: float) -> None:
        self._pending = pending
        self._started = started
        self._scores: Scores | None = None
        self.seconds = 0.0

    def done(self) -> bool:
        return self._scores is not None or self._pending.done()

    def result(self) -> Scores:
        if self._scores is None:
            self._scores = self._pending.result()
            self.seconds = time.perf_counter() - self._started
        return self._scores


class DeviceScorer:
    """On the detector's device, in the worker's process."""

    def __init__(self, detector: Detector) -> None:
        self._detector = detector
        self.overlaps = detector.device.type == "cuda"
        self.description = f"on {detector.device} in the worker"

    def submit(self, images: np.ndarray, *, caught_up: bool = False) -> _DevicePending:
        started = time.perf_counter()
        return _DevicePending(self._detector.submit(images), started)

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


class _ProcessPending:
    def __init__(self, owner: ProcessScorer, images: np.ndarray) -> None:
        self._owner = owner
        self._images = images
        self._pending: PendingProcessScores | None = None
        self._scores: Scores | None = None
        self.seconds = 0.0
        try:
            self._pending = owner.process.submit(images)
        except ScoringProcessError as exc:  # failed to start, or hung: result() restarts it
            logger.error("%s", exc)

    def done(self) -> bool:
        return self._scores is not None or self._pending is None or self._pending.done()

    def result(self) -> Scores:
        if self._scores is None:
            raw, self.seconds = self._owner.finish(self._pending, self._images)
            self._scores = Scores.judged(raw, self._owner.calibration)
        return self._scores


class ProcessScorer:
    """Full batches in a child process; batches cut by their deadline here, at once."""

    overlaps = True

    def __init__(
        self,
        *,
        detector: Detector,
        capacity: int,
        cpu_threads: int,
        timeout_s: float,
        on_error: Callable[[str, BaseException], None] = lambda kind, exc: None,
    ) -> None:
        self.calibration = detector.calibration
        self._on_error = on_error
        self._here = DeviceScorer(detector)
        self.process = ScoringProcess(
            model=detector.model,
            capacity=capacity,
            cpu_threads=cpu_threads,
            precision=detector.precision,
            int8_ranges=detector.int8_ranges,
            timeout_s=timeout_s,
        )
        self.restarts = 0
        self.description = "in a child process (caught-up batches in the worker)"

    def ready(self) -> bool:
        """Whether the child has loaded the model (safe to call from any thread)."""
        return self.process.ready()

    def submit(self, images: np.ndarray, *, caught_up: bool = False) -> PendingBatch:
        if caught_up:
            return self._here.submit(images)
        return _ProcessPending(self, images)

    def finish(
        self, pending: PendingProcessScores | None, images: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """Raw scores and seconds. A child that died, hung or never started is restarted and
        the batch scored again in the new one; an error the child reports for the batch
        itself, or a second failure, raises."""
        process = self.process
        try:
            if pending is None:
                raise ScoringProcessDiedError("scoring process did not take the batch")
            return pending.result()
        except ScoringProcessDiedError as exc:
            if pending is None or pending.generation == process.generation:
                self.restarts += 1
                self._on_error("scoring", exc)
                logger.error("%s; restarting it and scoring the batch there", exc)
                process.restart()
            return process.submit(images).result()

    def close(self) -> None:
        self.process.close()


def build_scorer(
    config: StreamConfig,
    *,
    detector: Detector,
    on_error: Callable[[str, BaseException], None] = lambda kind, exc: None,
) -> Scorer:
    """CUDA: the device itself (asynchronous). CPU: a child process (the default), or inline
    with `cpu_scoring: inline`. A child process starts loading the model at once."""
    if detector.device.type == "cuda" or config.cpu_scoring == "inline":
        return DeviceScorer(detector)
    return ProcessScorer(
        detector=detector,
        capacity=config.max_batch_size,
        cpu_threads=config.cpu_threads,
        timeout_s=config.scoring_timeout_s,
        on_error=on_error,
    )
