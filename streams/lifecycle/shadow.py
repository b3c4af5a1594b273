"""Shadow scoring: a candidate bundle scores every batch the serving model scored, in a thread of
its own, without any say in alerts or commits.

Its verdicts are counted per version (anomaly rate, disagreement with the serving model), its
scores feed its own drift window (quantiles, KS distance to its calibration), and, when
stream.shadow_topic is set, one JSON object per record goes there, keyed topic/partition/offset
like the alerts. A batch reaches the shadow only after the serving model's results for it are
published, so the shadow never delays them; at most `max_pending` batches wait for it, after
which the worker waits (a slow candidate costs throughput, never correctness).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from detector import Detector, Scores
from streams.lifecycle.drift import DriftMonitor
from streams.lifecycle.metrics import LifecycleMetrics

logger = logging.getLogger(__name__)

ErrorCallback = Callable[[str, BaseException], None]


class ShadowScorer:
    def __init__(
        self,
        detector: Detector,
        *,
        metrics: LifecycleMetrics,
        drift: DriftMonitor,
        producer: Any = None,
        topic: str = "",
        serving_version: Callable[[], str] = lambda: "",
        on_error: ErrorCallback | None = None,
        max_pending: int = 2,
    ) -> None:
        self.detector = detector
        self._metrics = metrics
        self._drift = drift
        self._producer = producer if topic else None
        self._topic = topic
        self._serving_version = serving_version
        self._on_error = on_error
        self._max_pending = max_pending
        self._pending: deque[Future[None]] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
        version = detector.version
        self._records = {
            outcome: metrics.model_records.labels(role="shadow", version=version, outcome=outcome)
            for outcome in ("normal", "anomaly")
        }
        self._disagreements = metrics.shadow_disagreements.labels(version=version)
        metrics.shadow_model.info(
            {"version": version, "threshold": repr(float(detector.threshold))}
        )
        self._threshold_json = repr(float(detector.threshold))
        logger.info("shadow model %s scores every batch beside the serving model", version)

    @property
    def sends(self) -> bool:
        """Whether verdicts go to a shadow topic (then `submit` needs the records' keys)."""
        return self._producer is not None

    def attach_producer(self, producer: Any) -> None:
        """The producer for the shadow topic, once connected (ignored without a topic)."""
        if self._topic:
            self._producer = producer

    def submit(
        self, images: np.ndarray, serving: Scores, keys: Sequence[tuple[str, int, int]] | None
    ) -> None:
        """Score `images` (the valid records of a served batch) with the candidate; `serving`
        holds the serving model's results for the same rows, `keys` their topic/partition/
        offset (needed only with a shadow topic)."""
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()
        if len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(
            self._executor.submit(self._score, images, serving.anomalous.copy(), keys)
        )

    def _score(
        self,
        images: np.ndarray,
        serving_anomalous: np.ndarray,
        keys: Sequence[tuple[str, int, int]] | None,
    ) -> None:
        try:
            scores = self.detector.score(images)
        except Exception as exc:  # the candidate must never take the worker down
            if self._on_error is not None:
                self._on_error("scoring", exc)
            logger.warning("shadow model %s failed on a batch: %s", self.detector.version, exc)
            return
        n_anomaly = int(scores.anomalous.sum())
        self._records["anomaly"].inc(n_anomaly)
        self._records["normal"].inc(len(scores) - n_anomaly)
        self._disagreements.inc(int(np.count_nonzero(scores.anomalous != serving_anomalous)))
        self._drift.observe(scores.scores)
        if self._producer is not None and keys is not None:
            self._send(scores, serving_anomalous, keys)

    def _send(
        self,
        scores: Scores,
        serving_anomalous: np.ndarray,
        keys: Sequence[tuple[str, int, int]],
    ) -> None:
        version = json.dumps(self.detector.version)
        serving_version = json.dumps(self._serving_version())
        for i, (topic, partition, offset) in enumerate(keys):
            value = (
                f'{{"topic":{json.dumps(topic)},"partition":{partition},"offset":{offset},'
                f'"score":{float(scores.scores[i])!r},"threshold":{self._threshold_json},'
                f'"p_value":{float(scores.p_values[i])!r},"anomaly":'
                f"{'true' if scores.anomalous[i] else 'false'},"
                f'"model_version":{version},"serving_model_version":{serving_version},'
                f'"serving_anomaly":{"true" if serving_anomalous[i] else "false"}}}'
            )
            future = self._producer.send(
                self._topic,
                key=f"{topic}/{partition}/{offset}".encode(),
                value=value.encode(),
            )
            if self._on_error is not None:
                future.add_errback(lambda exc: self._on_error("produce", exc))

    def drain(self) -> None:
        """Wait until every submitted batch has been scored."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        self.drain()
        self._executor.shutdown(wait=True)
        self._metrics.forget_model("shadow", self.detector.version)
        self._metrics.shadow_model.info({"version": "", "threshold": ""})
