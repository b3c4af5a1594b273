"""The model's lifecycle inside the worker loop: the hooks the loop calls between and after
batches, tying together hot reload (streams/model_watch.py), shadow scoring (streams/shadow.py)
and drift monitoring (streams/drift.py). docs/lifecycle.md has the operator's view.

The loop calls `observe` once per published batch with the serving model's results, and
`take_swap` before it starts scoring a batch; when a new model is ready it publishes what it has
in flight with the old model, swaps, and calls `swapped`. So every batch, and every alert and
score in it, is scored and judged by exactly one model version.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from detector import Detector, Scores
from streams.drift import DriftMonitor
from streams.lifecycle_metrics import LifecycleMetrics
from streams.model_watch import Candidate, ModelWatcher
from streams.shadow import ShadowScorer

logger = logging.getLogger(__name__)

_BATCH_SIZES_KEPT = 8  # distinct recent batch sizes a new model is warmed up on


def model_info(detector: Detector) -> dict[str, str]:
    """The labels of vaewatch_model_info for a serving model."""
    return {
        "version": detector.version,
        "device": str(detector.device),
        "calibration_method": str(detector.calibration.method),
    }


class ModelLifecycle:
    def __init__(
        self,
        *,
        detector: Detector,
        metrics: Any,  # streams.metrics.WorkerMetrics (threshold, target_fpr, model, lifecycle)
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
        self._lifecycle: LifecycleMetrics = metrics.lifecycle
        self.watcher = watcher
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
        return self.shadow is not None and self.shadow._producer is not None

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

    def take_swap(self) -> Candidate | None:
        return self.watcher.take() if self.watcher is not None else None

    def swapped(self, candidate: Candidate) -> None:
        """The loop now scores with `candidate`: gauges, info and the drift window follow."""
        old = self.detector
        self.detector = candidate.detector
        metrics = self._metrics
        metrics.threshold.set(self.detector.threshold)
        metrics.target_fpr.set(self.detector.calibration.target_fpr)
        metrics.model.info(model_info(self.detector))
        self._drift.recalibrated(self.detector.calibration)
        if old.version != self.detector.version:
            self._lifecycle.forget_model("serving", old.version)
        self._count_serving(self.detector)
        if self.watcher is not None:
            self.watcher.swapped(candidate)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        if self.shadow is not None:
            self.shadow.close()
