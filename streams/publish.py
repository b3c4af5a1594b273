"""What the worker writes: alerts, per-record scores and dead letters, as Kafka sends.

Alerts and scores are JSON objects keyed `topic/partition/offset` (so subscribers can drop the
duplicates that at-least-once delivery allows); the input record's headers pass through. An
output record goes to partition (input partition mod output partitions), which keeps the input
order per partition and spares kafka-python's pure-Python key hash on every send.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import numpy as np
from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord

from detector import Scores
from streams.codec import DecodedBatch

# Dead-letter headers (values are UTF-8 text).
H_ERROR = "vaewatch.error"
H_ERROR_DETAIL = "vaewatch.error.detail"
H_SOURCE_TOPIC = "vaewatch.source.topic"
H_SOURCE_PARTITION = "vaewatch.source.partition"
H_SOURCE_OFFSET = "vaewatch.source.offset"
H_SOURCE_TIMESTAMP = "vaewatch.source.timestamp_ms"
H_SCORES_FORMAT = "vaewatch.format"  # "jsonl" on batch-framed scores messages
_FRAME_BYTES = 256 * 1024  # largest batch-framed scores message
_TIMESTAMP = attrgetter("timestamp")
ID_HEADER = "id"  # with the raw codec, an `id` header stands in for the JSON `id` field


def _json_text(value: Any) -> str:
    return "null" if value is None else json.dumps(value)


def _key_text(key: bytes | None) -> str:
    return "null" if key is None else json.dumps(key.decode("utf-8", "backslashreplace"))


def _header_id(headers: Sequence[tuple[str, bytes]]) -> Any:
    for name, value in headers:
        if name == ID_HEADER and value is not None:
            return value.decode("utf-8", "backslashreplace")
    return None


@dataclass
class PublishedBatch:
    """The sends of one batch and what to count once the broker has acknowledged them all."""

    futures: list[Any]
    n_normal: int
    n_anomaly: int
    n_alerts: int
    dead_letter_reasons: list[str]
    timestamps_ms: np.ndarray  # of the valid records, for the end-to-end latency
    scores: np.ndarray


class ResultPublisher:
    def __init__(
        self,
        *,
        producer: KafkaProducer,
        alert_topic: str,
        scores_topic: str,
        dlq_topic: str,
        model_version: str,
        threshold: float,
        scores_format: str = "record",
    ) -> None:
        self._producer = producer
        self.scores_format = scores_format
        self.alert_topic = alert_topic
        self.scores_topic = scores_topic
        self.dlq_topic = dlq_topic
        self._version = json.dumps(model_version)
        self._threshold = repr(float(threshold))
        self._partitions: dict[str, int] = {}

    def _partition_count(self, topic: str) -> int:
        count = self._partitions.get(topic)
        if count is None:
            # Blocks (up to max_block_ms) until the topic's metadata is known.
            count = len(self._producer.partitions_for(topic) or ()) or 1
            self._partitions[topic] = count
        return count

    def _send_framed(self, topic: str, framed: dict[int, list[bytes]], parts: int) -> list:
        """scores_format=batch: per input partition, messages of JSON Lines of the same objects
        (at most _FRAME_BYTES each, well under the producer's 1 MiB request limit), keyed
        topic/partition/first-last offset."""
        futures = []
        for partition, lines in framed.items():
            start, size = 0, 0
            for end, line in enumerate(lines, 1):
                size += len(line) + 1
                if size >= _FRAME_BYTES or end == len(lines):
                    chunk = lines[start:end]
                    first = json.loads(chunk[0])["offset"]
                    last = json.loads(chunk[-1])["offset"]
                    futures.append(
                        self._producer.send(
                            self.scores_topic,
                            value=b"\n".join(chunk),
                            key=f"{topic}/{partition}/{first}-{last}".encode(),
                            headers=[(H_SCORES_FORMAT, b"jsonl")],
                            partition=partition % parts,
                        )
                    )
                    start, size = end, 0
        return futures

    def publish(
        self, records: Sequence[ConsumerRecord], decoded: DecodedBatch, scores: Scores | None
    ) -> PublishedBatch:
        send = self._producer.send
        futures: list[Any] = []
        now_ms = int(time.time() * 1000)
        if decoded.errors:
            valid_records = [records[i] for i in np.flatnonzero(decoded.valid).tolist()]
        else:  # the common case: every record decoded, no copy
            valid_records = records if isinstance(records, list) else list(records)
        n_anomaly = 0
        if valid_records and scores is not None:
            anomalous = scores.anomalous
            n_anomaly = int(np.count_nonzero(anomalous))
            ids = decoded.ids
            alert_parts = self._partition_count(self.alert_topic) if n_anomaly else 1
            score_parts = self._partition_count(self.scores_topic) if self.scores_topic else 1
            per_record_scores = self.scores_topic and self.scores_format == "record"
            # Without a scores topic only the anomalies produce output: visit just those rows
            # (about 10% of a batch) instead of every record.
            rows = (
                range(len(valid_records))
                if self.scores_topic
                else np.flatnonzero(anomalous).tolist()
            )
            flags = anomalous.tolist()
            score_list = scores.scores.tolist()
            p_list = scores.p_values.tolist()
            framed: dict[int, list[bytes]] = {}  # input partition -> JSON lines (batch format)
            topic_texts: dict[str, str] = {}
            for j in rows:
                record = valid_records[j]
                is_anomaly = flags[j]
                record_id = ids[j] if ids is not None else None
                if record_id is None and record.headers:
                    record_id = _header_id(record.headers)
                topic_json = topic_texts.get(record.topic)
                if topic_json is None:
                    topic_json = topic_texts[record.topic] = json.dumps(record.topic)
                body = (
                    f'{{"topic":{topic_json},"partition":{record.partition},'
                    f'"offset":{record.offset},"key":{_key_text(record.key)},'
                    f'"id":{_json_text(record_id)},"timestamp_ms":{record.timestamp},'
                    f'"score":{score_list[j]!r},"threshold":{self._threshold},'
                    f'"p_value":{p_list[j]!r},"model_version":{self._version},'
                    f'"scored_at_ms":{now_ms},"anomaly":{"true" if is_anomaly else "false"}}}'
                ).encode()
                if not (is_anomaly or per_record_scores):
                    framed.setdefault(record.partition, []).append(body)
                    continue
                key = f"{record.topic}/{record.partition}/{record.offset}".encode()
                headers = list(record.headers) if record.headers else None
                if is_anomaly:
                    futures.append(
                        send(
                            self.alert_topic,
                            value=body,
                            key=key,
                            headers=headers,
                            partition=record.partition % alert_parts,
                        )
                    )
                if per_record_scores:
                    futures.append(
                        send(
                            self.scores_topic,
                            value=body,
                            key=key,
                            headers=headers,
                            partition=record.partition % score_parts,
                        )
                    )
                elif self.scores_topic:
                    framed.setdefault(record.partition, []).append(body)
            futures.extend(self._send_framed(valid_records[0].topic, framed, score_parts))
        reasons = []
        if decoded.errors:
            dlq_parts = self._partition_count(self.dlq_topic)
            for i, (reason, detail) in sorted(decoded.errors.items()):
                record = records[i]
                headers = [
                    *(record.headers or ()),
                    (H_ERROR, reason.encode()),
                    (H_ERROR_DETAIL, detail.encode("utf-8", "backslashreplace")),
                    (H_SOURCE_TOPIC, record.topic.encode()),
                    (H_SOURCE_PARTITION, str(record.partition).encode()),
                    (H_SOURCE_OFFSET, str(record.offset).encode()),
                    (H_SOURCE_TIMESTAMP, str(record.timestamp).encode()),
                ]
                futures.append(
                    send(
                        self.dlq_topic,
                        value=record.value,
                        key=record.key,
                        headers=headers,
                        partition=record.partition % dlq_parts,
                    )
                )
                reasons.append(reason)
        timestamps = np.fromiter(
            map(_TIMESTAMP, valid_records), dtype=np.int64, count=len(valid_records)
        )
        return PublishedBatch(
            futures=futures,
            n_normal=len(valid_records) - n_anomaly,
            n_anomaly=n_anomaly,
            n_alerts=n_anomaly,
            dead_letter_reasons=reasons,
            timestamps_ms=timestamps,
            scores=scores.scores if scores is not None else np.empty(0, np.float32),
        )
