"""The worker's Prometheus metrics, declared once. Tests pass their own registry.

Names follow Prometheus conventions: counters end in _total, durations are in seconds, labels
have bounded values (outcome, reason, kind, partition of the one input topic).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from detector import Detector
from streams.buckets import BATCH_SIZE_BUCKETS, INFERENCE_BUCKETS, LATENCY_BUCKETS
from streams.codec import DEAD_LETTER_REASONS

UNSENDABLE = "unsendable"  # dead-letter reason: outputs that could not be sent (publish.py)
OUTCOMES = ("normal", "anomaly", "invalid")
ERROR_KINDS = ("broker", "produce", "commit", "decode", "scoring", "skipped", "model")
STAGES = ("fetch", "batching", "score", "publish", "ack")
# Outputs the broker refused (streams/worker/output_refusals.py), by output and reason.
REFUSED_OUTPUTS = ("alert", "score", "dead_letter")
REFUSAL_REASONS = ("too_large", "invalid_record", "invalid_timestamp", "not_authorized", "other")


class WorkerMetrics:
    """Every metric the worker exports. `score_buckets` come from the model's calibration, so the
    score histogram resolves the region around the threshold whatever the score's scale."""

    def __init__(self, *, registry: CollectorRegistry, score_buckets: Sequence[float]) -> None:
        self.records = Counter(
            "vaewatch_records",
            "Records consumed from the input topic, by outcome (normal, anomaly, invalid).",
            ["outcome"],
            registry=registry,
        )
        self.alerts_published = Counter(
            "vaewatch_alerts_published",
            "Alerts acknowledged by the broker on the alert topic.",
            registry=registry,
        )
        self.dead_letters = Counter(
            "vaewatch_dead_letters",
            "Records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=registry,
        )
        self.errors = Counter(
            "vaewatch_errors",
            "Errors by kind (broker, produce, commit, decode, scoring, skipped: a record "
            "committed without its outputs under stream.on_unsendable skip; model: a new "
            "bundle failed to load, the old one keeps serving).",
            ["kind"],
            registry=registry,
        )
        self.score = Histogram(
            "vaewatch_score",
            "Anomaly score of every valid record (the bundle's score: docs/model.md).",
            buckets=tuple(score_buckets),
            registry=registry,
        )
        self.batch_size = Histogram(
            "vaewatch_batch_size_records",
            "Records per scored batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.inference_seconds = Histogram(
            "vaewatch_batch_inference_seconds",
            "Time to score one batch on the device, copy in and out included.",
            buckets=INFERENCE_BUCKETS,
            registry=registry,
        )
        self.end_to_end_seconds = Histogram(
            "vaewatch_end_to_end_latency_seconds",
            "Record timestamp to the moment its result was acknowledged by the broker.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "vaewatch_stage_seconds",
            "Where a batch's time goes: fetch (its oldest record's timestamp to poll() returning "
            "it: producer, broker, fetch), batching (in the worker's buffer until the batch is "
            "cut), score (cut to scores in hand), publish (building and handing over its "
            "outputs), ack (handed over to acknowledged by the broker).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "vaewatch_consumer_lag_records",
            "Records behind the end of each assigned input partition.",
            ["topic", "partition"],
            registry=registry,
        )
        self.threshold = Gauge(
            "vaewatch_threshold",
            "Calibrated score threshold of the loaded model.",
            registry=registry,
        )
        self.target_fpr = Gauge(
            "vaewatch_target_fpr",
            "False-positive rate the threshold was calibrated for.",
            registry=registry,
        )
        self.ready = Gauge(
            "vaewatch_ready",
            "1 when the model is loaded, the broker reachable and partitions are assigned.",
            registry=registry,
        )
        self.model = Info("vaewatch_model", "The loaded model bundle.", registry=registry)
        self.outputs_refused = Counter(
            "vaewatch_outputs_refused",
            "Outputs the broker (or the client) refused, by output (alert, score, dead_letter) "
            "and reason (too_large, invalid_record: e.g. a null key for a compacted topic, "
            "invalid_timestamp, not_authorized, other); each is replaced by its record's dead "
            "letter or a smaller copy, or follows stream.on_unsendable (docs/delivery.md).",
            ["output", "reason"],
            registry=registry,
        )
        # processing_guarantee=exactly_once (docs/delivery.md): 0 otherwise.
        self.transactions = Counter(
            "vaewatch_transactions",
            "Kafka transactions that ended, by outcome (committed, aborted).",
            ["outcome"],
            registry=registry,
        )
        self.transaction_commit_seconds = Histogram(
            "vaewatch_transaction_commit_seconds",
            "Time to commit a transaction: flush its sends, add the offsets, commit.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Every series of the bounded label sets exists from the start at 0, so rate() and
        # increase() in alert rules count the first dead letter or error after a restart.
        for outcome in OUTCOMES:
            self.records.labels(outcome=outcome)
        for reason in (*DEAD_LETTER_REASONS, UNSENDABLE):
            self.dead_letters.labels(reason=reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for outcome in ("committed", "aborted"):
            self.transactions.labels(outcome=outcome)
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)
        for output in REFUSED_OUTPUTS:
            for reason in REFUSAL_REASONS:
                self.outputs_refused.labels(output=output, reason=reason)

    def count_error(self, kind: str, exc: BaseException) -> None:
        """The error callback of the worker's parts (scorer, lifecycle, clients): counted by
        kind in vaewatch_errors_total; each part logs its own message."""
        self.errors.labels(kind=kind).inc()

    def count_refused(self, output: str, reason: str) -> None:
        """An output refused (streams/worker/output_refusals.py); the batch logs its line."""
        self.outputs_refused.labels(output=output, reason=reason).inc()

    def serving(self, detector: Detector) -> None:
        """The threshold, target rate and info of the model that serves now."""
        self.threshold.set(detector.threshold)
        self.target_fpr.set(detector.calibration.target_fpr)
        self.model.info(model_info(detector))

    def observe_stages(
        self, *, produced: float | None, polled: float, cut: float, scored: float, sent: float
    ) -> None:
        """A batch's way through the worker from the time.time() stamps at which each stage
        ended; `produced` is its oldest record's timestamp, where it has one."""
        ends = {"fetch": polled, "batching": cut, "score": scored, "publish": sent}
        previous = produced
        for stage, end in ends.items():
            if previous is not None:
                self.stage_seconds.labels(stage=stage).observe(end - previous)
            previous = end


def model_info(detector: Detector) -> dict[str, str]:
    """The labels of vaewatch_model_info for a serving model."""
    return {
        "version": detector.version,
        "device": str(detector.device),
        "calibration_method": str(detector.calibration.method),
    }


def score_buckets(calibration_scores: np.ndarray, *, threshold: float) -> tuple[float, ...]:
    """Score histogram buckets from the calibration scores: quantiles of the normal scores, the
    threshold itself, and a few steps above it where anomalies land."""
    scores = np.sort(np.asarray(calibration_scores, dtype=np.float64))
    quantiles = np.quantile(scores, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99])
    spread = max(float(scores[-1] - scores[0]), abs(threshold) * 0.1, 1e-6)
    above = threshold + spread * np.array([0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    edges = np.unique(np.round(np.concatenate([quantiles, [threshold], above]), 6))
    return tuple(float(e) for e in edges)
