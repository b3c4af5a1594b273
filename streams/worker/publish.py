"""What the worker writes: alerts, scores and dead letters, built as messages.

`ResultPublisher.build` is a pure function of (records, decoded images, scores): it returns the
batch's outgoing messages and what to count once they are acknowledged; the batch's owner
(streams/worker/delivery.py) sends them with `send`, retries them and replaces what the broker
refuses (`dead_letter_copy`, `single_lines`: streams/worker/batch.py).

Alerts and scores are JSON objects keyed `topic/partition/offset` (so subscribers can drop the
duplicates that at-least-once delivery allows); the input record's headers pass through. With
`stream.alert_format` or `stream.scores_format` batch, a topic gets the same objects as frames
instead: JSON Lines, one message per input partition and batch, keyed
`topic/partition/first-last`, since kafka-python's producer costs tens of microseconds of CPU
per message. An output record goes to partition (input partition mod output partitions), which
keeps the input order per partition and spares kafka-python's pure-Python key hash on every
send. What a dead letter carries is in streams/worker/dead_letters.py.

A record that decoded and was scored can still be unfit to publish as it is: a score that JSON
cannot hold (NaN, infinity) makes it a `scoring_error` dead letter (one check on the whole
batch), an `id` header that its alert or score would carry and that is over MAX_ID_BYTES as
JSON a `bad_id` one (checked where the id is looked up, for the records that have output).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import compress
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np
from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord

from detector import Scores
from streams.client_internals import observe_many
from streams.codec import BAD_ID, MAX_ID_BYTES, SCORING_ERROR, DecodedBatch, check_id
from streams.worker.dead_letters import (
    NO_TIMESTAMP,
    dead_letter_headers,
    trimmed_copy,
    usable_headers,
)
from streams.worker.metrics import WorkerMetrics
from streams.worker.output_refusals import FRAME_BYTES

H_FORMAT = "vaewatch.format"
FRAME_HEADER = (H_FORMAT, b"jsonl")  # on the frames of batch-framed alerts and scores
_TIMESTAMP = attrgetter("timestamp")
ID_HEADER = "id"  # with the raw codec, an `id` header stands in for the JSON `id` field
# An id header this long (in characters) or shorter fits in MAX_ID_BYTES as JSON, whatever its
# characters (at most 12 bytes each: \ud83d\ude00).
_SHORT_ID_CHARS = (MAX_ID_BYTES - 2) // 12


def output_values(value: bytes | None, headers: Sequence[tuple[str, bytes]] | None) -> list[bytes]:
    """The JSON objects (as bytes) one alerts or scores message carries, for its readers: the
    lines of a frame (`is_frame`), else the value itself."""
    if value is None:
        return []
    return value.split(b"\n") if is_frame(headers) else [value]


def is_frame(headers: Sequence[tuple[str, bytes]] | None) -> bool:
    """Whether a message with these headers is a frame of JSON Lines (batch format)."""
    return headers is not None and FRAME_HEADER in headers


def _json_text(value: Any) -> str:
    return "null" if value is None else json.dumps(value)


def _key_text(key: bytes | None) -> str:
    return "null" if key is None else json.dumps(key.decode("utf-8", "backslashreplace"))


class Outgoing(NamedTuple):
    """One send, kept until acknowledged so that it can be retried or replaced.
    `sources`: indexes (in the batch) of the input records it carries. `form`: "output" as
    built, or what replaced a refused one: "line" (one line of a refused frame),
    "copy" (a trimmed dead-letter copy), "bare" (a dead letter without the input's value)."""

    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]] | None
    partition: int
    sources: tuple[int, ...]
    form: str = "output"

    @property
    def size(self) -> int:
        """Roughly what the broker counts against max.message.bytes."""
        headers = sum(len(name) + len(value) for name, value in self.headers or ())
        return len(self.value or b"") + len(self.key or b"") + headers


class FailedSend:
    """An exception raised by producer.send() itself, made to look like a failed future."""

    is_done = True

    def __init__(self, exception: BaseException) -> None:
        self.exception = exception

    def failed(self) -> bool:
        return True


def _header_id(headers: Sequence[tuple[str, bytes]]) -> Any:
    for name, value in headers:
        if name == ID_HEADER and value is not None:
            return value.decode("utf-8", "backslashreplace")
    return None


def _non_finite(decoded: DecodedBatch, scores: Scores) -> dict[int, tuple[str, str]]:
    """Scored records (by batch index) whose score or p-value JSON cannot hold."""
    if np.isfinite(scores.scores).all() and np.isfinite(scores.p_values).all():
        return {}
    positions = np.flatnonzero(decoded.valid)
    finite = np.isfinite(scores.scores) & np.isfinite(scores.p_values)
    return {
        int(positions[j]): (
            SCORING_ERROR,
            f"score {float(scores.scores[j])!r}, p-value {float(scores.p_values[j])!r}: not finite",
        )
        for j in np.flatnonzero(~finite).tolist()
    }


def _without(
    decoded: DecodedBatch, scores: Scores, errors: dict[int, tuple[str, str]]
) -> tuple[DecodedBatch, Scores]:
    """The batch with the records in `errors` moved from the scored ones to the invalid ones."""
    rejected = np.zeros(len(decoded.valid), dtype=bool)
    rejected[list(errors)] = True
    kept = ~rejected[decoded.valid]  # over the scored records, in order
    decoded = DecodedBatch(
        images=decoded.images[kept],
        valid=decoded.valid & ~rejected,
        errors={**decoded.errors, **errors},
        ids=None if decoded.ids is None else list(compress(decoded.ids, kept)),
    )
    scores = replace(
        scores,
        scores=scores.scores[kept],
        p_values=scores.p_values[kept],
        anomalous=scores.anomalous[kept],
    )
    return decoded, scores


@dataclass
class Outputs:
    """The messages of one batch and what to count once the broker has acknowledged them all."""

    records: Sequence[Any]
    messages: list[Outgoing]
    n_normal: int
    n_anomaly: int
    n_alerts: int
    dead_letter_reasons: list[str]
    # of the scored records whose timestamp can give a latency: not "none" (negative), not in
    # the future; for the end-to-end latency
    timestamps_ms: np.ndarray
    scores: np.ndarray

    def count(self, metrics: WorkerMetrics) -> None:
        """Count the batch once the broker has acknowledged all of it."""
        m = metrics
        m.records.labels(outcome="normal").inc(self.n_normal)
        m.records.labels(outcome="anomaly").inc(self.n_anomaly)
        m.records.labels(outcome="invalid").inc(len(self.records) - len(self.scores))
        if self.n_alerts:
            m.alerts_published.inc(self.n_alerts)
        for reason in self.dead_letter_reasons:
            m.dead_letters.labels(reason=reason).inc()
        observe_many(m.score, self.scores)
        if len(self.timestamps_ms):
            observe_many(m.end_to_end_seconds, time.time() - self.timestamps_ms / 1000.0)


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
        alert_format: str = "record",
        max_request_size: int = 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._producer = producer
        self._clock = clock  # the outputs' timestamps and scored_at_ms
        self._max_request_size = max_request_size
        self.scores_format = scores_format
        self.alert_format = alert_format
        self.alert_topic = alert_topic
        self.scores_topic = scores_topic
        self.dlq_topic = dlq_topic
        self._version = json.dumps(model_version)
        self._threshold = repr(float(threshold))
        self._partitions: dict[str, int] = {}

    def _partition_count(self, topic: str) -> int:
        count = self._partitions.get(topic)
        if count is None:
            # Blocks (up to max_block_ms) until the topic's metadata is known. When that fails,
            # partition 0 is used this time and the send itself reports the failure.
            try:
                count = len(self._producer.partitions_for(topic) or ()) or 1
            except Exception:
                return 1
            self._partitions[topic] = count
        return count

    def send(self, message: Outgoing) -> Any:
        """Send `message`; what send() raises comes back as a FailedSend."""
        try:
            return self._producer.send(
                message.topic,
                value=message.value,
                key=message.key,
                headers=message.headers,
                partition=message.partition,
                timestamp_ms=int(self._clock() * 1000),
            )
        except Exception as exc:  # TypeError, ValueError, MessageSizeTooLarge, timeouts, ...
            return FailedSend(exc)

    def dead_letter_copy(
        self,
        record: ConsumerRecord,
        exc: BaseException,
        first_reason: bytes | None,
        *,
        source: int,
        bare: bool = False,
    ) -> Outgoing:
        """The record's dead letter with reason `unsendable` (trimmed_copy): cut to fit the
        producer's request size, or `bare`, without the input's value and headers."""
        value, key, headers = trimmed_copy(
            record, exc, first_reason, max_request_size=self._max_request_size, bare=bare
        )
        part = record.partition % self._partition_count(self.dlq_topic)
        form = "bare" if bare else "copy"
        return Outgoing(self.dlq_topic, value, key, headers, part, (source,), form)

    def single_lines(self, records: Sequence[ConsumerRecord], frame: Outgoing) -> list[Outgoing]:
        """A frame (of alerts or scores) the topic refused, as one message per line (form
        "line")."""
        first = records[frame.sources[0]]
        lines = {first.partition: list(zip(frame.sources, frame.value.split(b"\n"), strict=True))}
        messages: list[Outgoing] = []
        parts = self._partition_count(frame.topic)
        self._frame(messages, frame.topic, first.topic, lines, parts, 0)
        return [m._replace(form="line") for m in messages]

    def _frame(
        self,
        messages: list[Outgoing],
        output_topic: str,
        topic: str,
        framed: dict[int, list[tuple[int, bytes]]],
        parts: int,
        frame_bytes: int,
    ) -> None:
        """Batch format: per input partition of `topic`, messages to `output_topic` of JSON
        Lines of the objects (at most `frame_bytes` each, well under the producer's request
        limit), keyed topic/partition/first-last offset."""
        for partition, lines in framed.items():
            start, size = 0, 0
            for end, (_, line) in enumerate(lines, 1):
                size += len(line) + 1
                if size >= frame_bytes or end == len(lines):
                    chunk = lines[start:end]
                    first = json.loads(chunk[0][1])["offset"]
                    last = json.loads(chunk[-1][1])["offset"]
                    message = Outgoing(
                        topic=output_topic,
                        value=b"\n".join(line for _, line in chunk),
                        key=f"{topic}/{partition}/{first}-{last}".encode(),
                        headers=[FRAME_HEADER],
                        partition=partition % parts,
                        sources=tuple(source for source, _ in chunk),
                    )
                    messages.append(message)
                    start, size = end, 0

    def build(
        self,
        records: Sequence[ConsumerRecord],
        decoded: DecodedBatch,
        scores: Scores | None,
        *,
        frame_bytes: int = FRAME_BYTES,
    ) -> Outputs:
        messages: list[Outgoing] = []
        send = messages.append
        now_ms = int(self._clock() * 1000)
        if scores is not None and decoded.n_valid:
            late = _non_finite(decoded, scores)
            if late:
                decoded, scores = _without(decoded, scores, late)
        # scored records found unfit while their outputs are built: index -> (reason, detail)
        bad_ids: dict[int, tuple[str, str]] = {}
        bad_rows: list[int] = []
        if decoded.errors:
            positions = np.flatnonzero(decoded.valid).tolist()
            valid_records = [records[i] for i in positions]
        else:  # the common case: every record decoded, no copy
            positions = None
            valid_records = records if isinstance(records, list) else list(records)
        try:
            timestamps = np.fromiter(
                map(_TIMESTAMP, valid_records), dtype=np.int64, count=len(valid_records)
            )
        except TypeError:  # None: message format v0 has no timestamp
            timestamps = np.fromiter(
                (NO_TIMESTAMP if r.timestamp is None else r.timestamp for r in valid_records),
                dtype=np.int64,
                count=len(valid_records),
            )
        n_anomaly = 0
        if valid_records and scores is not None:
            anomalous = scores.anomalous
            n_anomaly = int(np.count_nonzero(anomalous))
            ids = decoded.ids
            alert_parts = self._partition_count(self.alert_topic) if n_anomaly else 1
            score_parts = self._partition_count(self.scores_topic) if self.scores_topic else 1
            per_record_scores = self.scores_topic and self.scores_format == "record"
            frame_alerts = self.alert_format == "batch"
            # Without a scores topic only the anomalies produce output: visit just those rows
            # instead of every record.
            rows = (
                range(len(valid_records))
                if self.scores_topic
                else np.flatnonzero(anomalous).tolist()
            )
            flags = anomalous.tolist()
            stamps = timestamps.tolist()
            score_list = scores.scores.tolist()
            p_list = scores.p_values.tolist()
            # input partition -> (record index, JSON line) (batch format), scores and alerts
            framed: dict[int, list[tuple[int, bytes]]] = {}
            framed_alerts: dict[int, list[tuple[int, bytes]]] = {}
            topic_texts: dict[str, str] = {}
            for j in rows:
                record = valid_records[j]
                source = (j if positions is None else positions[j],)
                is_anomaly = flags[j]
                record_id = ids[j] if ids is not None else None
                if record_id is None and record.headers:
                    record_id = _header_id(record.headers)
                    if (
                        record_id is not None
                        and len(record_id) > _SHORT_ID_CHARS
                        and (problem := check_id(record_id)) is not None
                    ):
                        bad_ids[source[0]] = (BAD_ID, f"id header: {problem}")
                        bad_rows.append(j)
                        continue
                topic_json = topic_texts.get(record.topic)
                if topic_json is None:
                    topic_json = topic_texts[record.topic] = json.dumps(record.topic)
                body = (
                    f'{{"topic":{topic_json},"partition":{record.partition},'
                    f'"offset":{record.offset},"key":{_key_text(record.key)},'
                    f'"id":{_json_text(record_id)},"timestamp_ms":{stamps[j]},'
                    f'"score":{score_list[j]!r},"threshold":{self._threshold},'
                    f'"p_value":{p_list[j]!r},"model_version":{self._version},'
                    f'"scored_at_ms":{now_ms},"anomaly":{"true" if is_anomaly else "false"}}}'
                ).encode()
                alert_alone = is_anomaly and not frame_alerts
                if is_anomaly and frame_alerts:
                    framed_alerts.setdefault(record.partition, []).append((source[0], body))
                if not (alert_alone or per_record_scores):
                    if self.scores_topic:
                        framed.setdefault(record.partition, []).append((source[0], body))
                    continue
                key = f"{record.topic}/{record.partition}/{record.offset}".encode()
                headers = usable_headers(record.headers) if record.headers else None
                if alert_alone:
                    part = record.partition % alert_parts
                    send(
                        Outgoing(self.alert_topic, body, key, headers, part, source),
                    )
                if per_record_scores:
                    part = record.partition % score_parts
                    send(
                        Outgoing(self.scores_topic, body, key, headers, part, source),
                    )
                elif self.scores_topic:
                    framed.setdefault(record.partition, []).append((source[0], body))
            input_topic = valid_records[0].topic
            self._frame(
                messages, self.alert_topic, input_topic, framed_alerts, alert_parts, frame_bytes
            )
            self._frame(messages, self.scores_topic, input_topic, framed, score_parts, frame_bytes)
        n_scored = len(valid_records)
        score_values = scores.scores if scores is not None else np.empty(0, np.float32)
        errors = decoded.errors
        if bad_rows:
            n_anomaly -= int(np.count_nonzero(anomalous[bad_rows]))
            n_scored -= len(bad_rows)
            kept = np.ones(len(valid_records), dtype=bool)
            kept[bad_rows] = False
            score_values, timestamps = score_values[kept], timestamps[kept]
            errors = {**errors, **bad_ids}
        reasons = []
        if errors:
            dlq_parts = self._partition_count(self.dlq_topic)
            for i, (reason, detail) in sorted(errors.items()):
                record = records[i]
                headers = dead_letter_headers(record, reason, detail)
                part = record.partition % dlq_parts
                value = record.value
                if value is None and record.key is None:
                    value = b""  # kafka-python sends no record without both key and value
                send(
                    Outgoing(self.dlq_topic, value, record.key, headers, part, (i,)),
                )
                reasons.append(reason)
        if len(timestamps) and not (
            timestamps.min() >= 0 and timestamps.max() <= now_ms  # the common case: no copy
        ):
            timestamps = timestamps[(timestamps >= 0) & (timestamps <= now_ms)]
        return Outputs(
            records=records,
            messages=messages,
            n_normal=n_scored - n_anomaly,
            n_anomaly=n_anomaly,
            n_alerts=n_anomaly,
            dead_letter_reasons=reasons,
            timestamps_ms=timestamps,
            scores=score_values,
        )
