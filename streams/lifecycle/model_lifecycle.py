"""The model's lifecycle inside the worker loop: the hooks the loop calls between and after
batches, tying together hot reload (model_watch.py), shadow scoring (shadow.py) and drift
monitoring (drift.py). docs/lifecycle.md has the operator's view.

The loop calls `observe_batch` once per published batch with the serving model's results, and
`take_swap` before it starts scoring a batch; when a new model is ready it publishes what it has
in flight with the old model, swaps, and calls `swapped`. So every batch, and every alert and
score in it, is scored and judged by exactly one model version.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detector import Detector, Scores
from detector.config import IMAGE_PIXELS
from streams.codec import DecodedBatch
from streams.lifecycle.config import LifecycleConfig
from streams.lifecycle.drift import DriftMonitor
from streams.lifecycle.metrics import LifecycleMetrics
from streams.lifecycle.model_watch import Candidate, ModelWatcher
from streams.lifecycle.shadow import ShadowScorer
from streams.worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

_BATCH_SIZES_KEPT = 8  # distinct recent batch sizes a new model is warmed up on
_ADMIN_WAIT_S = 4.0  # POST /admin/reload answers within the metrics server's connection timeout
_SCORER_START_S = 120.0  # longest wait for a new model's scoring process to load it


class ModelLifecycle:
    def __init__(
        self,
        *,
        detector: Detector,
        metrics: WorkerMetrics,
        lifecycle_metrics: LifecycleMetrics,
        drift_window_records: int,
        drift_interval_s: float,
        watcher: ModelWatcher | None = None,
        shadow: Detector | None = None,
        shadow_producer: Any = None,
        shadow_topic: str = "",
        on_error: Any = None,
    ) -> None:
        self.detector = detector
        self._metrics = metrics
        self._lifecycle = lifecycle_metrics
        self.watcher = watcher
        self._make_publisher: Callable[[Detector], Any] | None = None
        self._batch_sizes: deque[int] = deque(maxlen=_BATCH_SIZES_KEPT)
        self._drift = DriftMonitor(
            detector.calibration,
            window_records=drift_window_records,
            interval_s=drift_interval_s,
            export=lambda stats: self._lifecycle.export_drift("serving", stats),
        )
        self._count_serving(detector)
        self.shadow: ShadowScorer | None = None
        if shadow is not None:
            self.shadow = ShadowScorer(
                shadow,
                metrics=self._lifecycle,
                drift=DriftMonitor(
                    shadow.calibration,
                    window_records=drift_window_records,
                    interval_s=drift_interval_s,
                    export=lambda stats: self._lifecycle.export_drift("shadow", stats),
                ),
                producer=shadow_producer,
                topic=shadow_topic,
                serving_version=lambda: self.detector.version,
                on_error=on_error,
            )

    def _count_serving(self, detector: Detector) -> None:
        self._serving_records = {
            outcome: self._lifecycle.model_records.labels(
                role="serving", version=detector.version, outcome=outcome
            )
            for outcome in ("normal", "anomaly")
        }

    @property
    def needs_keys(self) -> bool:
        """Whether `observe` wants each valid record's topic/partition/offset."""
        return self.shadow is not None and self.shadow.sends

    def batch_sizes(self) -> Sequence[int]:
        """Recent batch sizes (for warming a new model up on real shapes)."""
        return tuple(self._batch_sizes) or (1,)

    def observe(
        self,
        images: np.ndarray,
        scores: Scores,
        keys: Sequence[tuple[str, int, int]] | None = None,
    ) -> None:
        """After the serving model scored a batch's valid `images`: counts, drift window, and
        the shadow's turn."""
        n = len(scores)
        if n == 0:
            return
        self._batch_sizes.append(n)
        n_anomaly = int(scores.anomalous.sum())
        self._serving_records["anomaly"].inc(n_anomaly)
        self._serving_records["normal"].inc(n - n_anomaly)
        self._drift.observe(scores.scores)
        if self.shadow is not None:
            self.shadow.submit(images, scores, keys)

    def observe_batch(self, records: Sequence[Any], decoded: DecodedBatch, scores: Scores) -> None:
        """`observe` for a worker batch: its valid records' images, scores and, where the
        shadow compares per record, their (topic, partition, offset)."""
        keys = None
        if self.needs_keys:
            valid = decoded.valid.tolist()
            pairs = zip(records, valid, strict=True)
            keys = [(r.topic, r.partition, r.offset) for r, ok in pairs if ok]
        self.observe(decoded.images, scores, keys)

    def take_swap(self) -> Candidate | None:
        return self.watcher.take() if self.watcher is not None else None

    def publisher_for(self, detector: Detector) -> Any:
        """The outputs' publisher for a new model (it names the model in every output)."""
        if self._make_publisher is None:
            raise RuntimeError("attach_producer was not called")
        return self._make_publisher(detector)

    def swapped(self, candidate: Candidate, *, old_scorer: Any = None) -> None:
        """The loop now scores with `candidate`: gauges, info and the drift window follow, and
        the old scorer is closed (in a thread: stopping a scoring process waits for it)."""
        if old_scorer is not None:
            threading.Thread(target=old_scorer.close, name="close-old-scorer", daemon=True).start()
        old = self.detector
        self.detector = candidate.detector
        self._metrics.serving(self.detector)
        self._drift.recalibrated(self.detector.calibration)
        if old.version != self.detector.version:
            self._lifecycle.forget_model("serving", old.version)
        self._count_serving(self.detector)
        if self.watcher is not None:
            self.watcher.swapped(candidate)

    def attach_producer(
        self, producer: Any, *, make_publisher: Callable[[Detector], Any] | None = None
    ) -> None:
        """The worker's producer, once connected: the shadow topic's sends go through it, and
        `make_publisher` makes the outputs' publisher of a model swapped in."""
        self._make_publisher = make_publisher
        if self.shadow is not None:
            self.shadow.attach_producer(producer)

    def admin(self, path: str) -> tuple[str, dict[str, Any]]:
        """POST /admin/reload: reload the model path now; answers the outcome, or `pending` when
        loading takes longer than the HTTP answer may wait (the outcome is then in the metrics
        and the log)."""
        if path != "/admin/reload" or self.watcher is None:
            return "404 Not Found", {"error": f"unknown admin action {path}"}
        outcome = self.watcher.reload_and_wait("POST /admin/reload", timeout_s=_ADMIN_WAIT_S)
        if outcome is None:
            return "202 Accepted", {"outcome": "pending"}
        status = "500 Internal Server Error" if outcome.outcome == "failed" else "200 OK"
        return status, outcome.as_dict()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        if self.shadow is not None:
            self.shadow.close()


def _ready_scorer(
    make_scorer: Callable[[Detector], Any], sizes: Callable[[], Sequence[int]]
) -> Callable[[Detector], Any]:
    """A new model's scorer, started, waited for and warmed up on the worker's batch sizes
    through its own path (a scoring process's first batches are slow), all in the watcher's
    thread while the worker goes on with the old one."""

    def prepare(detector: Detector) -> Any:
        scorer = make_scorer(detector)
        try:
            deadline = time.monotonic() + _SCORER_START_S
            while not scorer.ready():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"its scorer did not start within {_SCORER_START_S:g} s")
                time.sleep(0.05)
            for size in sorted({max(1, int(n)) for n in sizes()}):
                scorer.submit(np.zeros((size, IMAGE_PIXELS), dtype=np.uint8)).result()
        except BaseException:
            scorer.close()
            raise
        return scorer

    return prepare


def build_lifecycle(
    *,
    config: LifecycleConfig,
    detector: Detector,
    metrics: WorkerMetrics,
    lifecycle_metrics: LifecycleMetrics,
    model_path: str | Path | None,
    shadow: Detector | None,
    make_scorer: Callable[[Detector], Any],
    on_error: Callable[[str, BaseException], None],
) -> ModelLifecycle:
    """The worker's lifecycle: a watcher on `model_path` (none without one), the shadow."""
    lifecycle: ModelLifecycle

    def load(path: Path) -> Detector:
        return Detector.from_bundle(path, detector.settings)

    watcher = None
    if model_path is not None:
        watcher = ModelWatcher(
            model_path,
            load=load,
            serving_version=detector.version,
            metrics=lifecycle_metrics,
            on_error=on_error,
            interval_s=config.watch_interval_s,
            warmup_sizes=lambda: lifecycle.batch_sizes(),
            prepare=_ready_scorer(make_scorer, lambda: lifecycle.batch_sizes()),
            dispose=lambda scorer: scorer.close(),
        )
    lifecycle = ModelLifecycle(
        detector=detector,
        metrics=metrics,
        lifecycle_metrics=lifecycle_metrics,
        drift_window_records=config.drift_window_records,
        drift_interval_s=config.drift_interval_s,
        watcher=watcher,
        shadow=shadow,
        shadow_topic=config.shadow_topic,
        on_error=on_error,
    )
    if watcher is not None:
        watcher.start()
    return lifecycle


def reload_on_sighup(lifecycle: ModelLifecycle) -> Callable[[], None]:
    """SIGHUP asks for a reload (main thread only); returns what restores the old handler."""
    watcher = lifecycle.watcher
    if watcher is None or threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: watcher.request("SIGHUP"))
    return lambda: signal.signal(signal.SIGHUP, previous)
