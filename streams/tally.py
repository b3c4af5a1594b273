"""Reads the scores topic back and keeps count against the labels (for the demo's live summary
and for benchmarks). Duplicates from at-least-once delivery are dropped by the record's key."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from kafka import TopicPartition

from streams.config import StreamConfig
from streams.kafka_io import create_consumer
from streams.replay import ANOMALY_HEADER, LABEL_HEADER


@dataclass
class Tally:
    scored: int = 0
    flagged: int = 0
    true_positives: int = 0
    labelled_anomalies: int = 0
    duplicates: int = 0
    first_at: float | None = None
    last_at: float | None = None
    seen: set[bytes] = field(default_factory=set)
    # label header text -> [scored, flagged]: what the detector does with each class
    by_label: dict[str, list[int]] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)  # of the labelled records, in order
    truths: list[bool] = field(default_factory=list)  # whether each of those is an anomaly

    @property
    def false_positive_rate(self) -> float:
        """Share of the labelled-normal records that raised an alert."""
        normal = self.scored - self.labelled_anomalies
        return (self.flagged - self.true_positives) / normal if normal else float("nan")

    @property
    def precision(self) -> float:
        return self.true_positives / self.flagged if self.flagged else float("nan")

    @property
    def recall(self) -> float:
        return self.true_positives / self.labelled_anomalies if self.labelled_anomalies else 0.0

    @property
    def rate(self) -> float:
        if self.first_at is None or self.last_at is None or self.last_at <= self.first_at:
            return 0.0
        return self.scored / (self.last_at - self.first_at)


class ScoresReader:
    """Assigns every partition of the scores topic (no group: no join to wait for)."""

    def __init__(self, *, config: StreamConfig, topic: str) -> None:
        # From the start of each partition whatever the worker's settings: every score counts.
        reading = config.model_copy(
            update={"auto_offset_reset": "earliest", "fetch_max_wait_ms": 50}
        )
        self._consumer = create_consumer(config=reading, grouped=False, client_id="vaewatch-demo")
        partitions = self._consumer.partitions_for_topic(topic) or {0}
        self._consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        self.tally = Tally()

    def poll(self, timeout_ms: int = 100) -> Tally:
        polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=10000)
        now = time.monotonic()
        tally = self.tally
        for records in polled.values():
            for record in records:
                if record.key in tally.seen:
                    tally.duplicates += 1
                    continue
                tally.seen.add(record.key)
                result = json.loads(record.value)
                headers = dict(record.headers or ())
                truth = headers.get(ANOMALY_HEADER) == b"1"
                tally.scored += 1
                tally.flagged += bool(result["anomaly"])
                if ANOMALY_HEADER in headers:
                    tally.scores.append(float(result["score"]))
                    tally.truths.append(truth)
                label = headers.get(LABEL_HEADER)
                if label is not None:
                    counts = tally.by_label.setdefault(label.decode(errors="replace"), [0, 0])
                    counts[0] += 1
                    counts[1] += bool(result["anomaly"])
                tally.labelled_anomalies += truth
                tally.true_positives += bool(result["anomaly"]) and truth
                if tally.first_at is None:
                    tally.first_at = now
                tally.last_at = now
        return tally

    def close(self) -> None:
        self._consumer.close()
