"""Images replayed from a range of a Kafka topic, for `vaewatch recalibrate --data kafka:...`.

    kafka:TOPIC                         every partition, from its first offset to its current end
    kafka:TOPIC:PARTITION               one partition, first offset to current end
    kafka:TOPIC:PARTITION:START-END     one partition, offsets START up to END (END excluded)

The reader assigns partitions directly (no consumer group, nothing committed), decodes values
with the stream's codec and skips the records that do not decode, counting them.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from detector.preprocess import ImageDecoding
from streams.codec import decode_batch
from streams.config import StreamConfig
from streams.connection_errors import describe_authorization_error, describe_kafka_error
from streams.kafka_io import create_consumer, topic_access_error

logger = logging.getLogger(__name__)

PREFIX = "kafka:"
_SPEC = re.compile(
    r"^kafka:(?P<topic>[A-Za-z0-9._-]+)"
    r"(?::(?P<partition>\d+)(?::(?P<start>\d+)-(?P<end>\d+))?)?$"
)


class TopicRangeError(ValueError):
    """A kafka: source is malformed or its range cannot be read. The message is one line."""


@dataclass(frozen=True)
class TopicRange:
    topic: str
    partition: int | None = None
    start: int | None = None
    end: int | None = None

    def __str__(self) -> str:
        text = f"{PREFIX}{self.topic}"
        if self.partition is not None:
            text += f":{self.partition}"
        if self.start is not None:
            text += f":{self.start}-{self.end}"
        return text


@dataclass(frozen=True)
class TopicImages:
    images: np.ndarray  # uint8 N x 784, in offset order per partition
    n_records: int
    n_invalid: int
    offsets: dict[int, tuple[int, int]]  # partition -> (first, end) read

    @property
    def provenance(self) -> dict[str, Any]:
        """What a recalibrated bundle records of where its calibration images came from."""
        offsets = {str(p): list(bounds) for p, bounds in self.offsets.items()}
        return {"offsets": offsets, "n_invalid": self.n_invalid}


def parse_topic_range(spec: str) -> TopicRange:
    match = _SPEC.match(spec)
    if match is None:
        raise TopicRangeError(
            f"{spec!r}: expected kafka:TOPIC, kafka:TOPIC:PARTITION or "
            "kafka:TOPIC:PARTITION:START-END"
        )
    partition = match["partition"]
    start, end = match["start"], match["end"]
    if start is not None and int(end) <= int(start):
        raise TopicRangeError(f"{spec!r}: END must be greater than START")
    return TopicRange(
        topic=match["topic"],
        partition=None if partition is None else int(partition),
        start=None if start is None else int(start),
        end=None if end is None else int(end),
    )


def read_topic_range(
    source: TopicRange,
    *,
    config: StreamConfig,
    timeout_s: float = 60.0,
    images: ImageDecoding | None = None,
) -> TopicImages:
    """Every record of the range, decoded (image files by `images`, the bundle's preprocessing);
    raises TopicRangeError when the topic or partition does not exist, or when the range is not
    there (yet) after `timeout_s`."""
    consumer = create_consumer(config=config, grouped=False)
    try:
        partitions = consumer.partitions_for_topic(source.topic)
        if not partitions:
            refused = topic_access_error(config, source.topic)
            why = refused and describe_authorization_error(refused, config, operation="READ")
            raise TopicRangeError(f"{source}: {why or f'topic {source.topic!r} does not exist'}")
        if source.partition is not None and source.partition not in partitions:
            raise TopicRangeError(
                f"{source}: partition {source.partition} not in {sorted(partitions)}"
            )
        wanted = [source.partition] if source.partition is not None else sorted(partitions)
        tps = [TopicPartition(source.topic, p) for p in wanted]
        consumer.assign(tps)
        firsts = consumer.beginning_offsets(tps)
        lasts = consumer.end_offsets(tps)
        bounds: dict[TopicPartition, tuple[int, int]] = {}
        for tp in tps:
            first = firsts[tp] if source.start is None else source.start
            end = lasts[tp] if source.end is None else source.end
            if source.end is not None and source.end > lasts[tp]:
                raise TopicRangeError(
                    f"{source}: partition {tp.partition} ends at offset {lasts[tp]}"
                )
            if first < firsts[tp]:
                raise TopicRangeError(
                    f"{source}: partition {tp.partition} starts at offset {firsts[tp]}"
                )
            if end > first:
                bounds[tp] = (first, end)
        consumer.assign(list(bounds))
        for tp, (first, _) in bounds.items():
            consumer.seek(tp, first)
        values: dict[TopicPartition, list[bytes | None]] = {tp: [] for tp in bounds}
        left = set(bounds)
        deadline = time.monotonic() + timeout_s
        while left:
            if time.monotonic() > deadline:
                raise TopicRangeError(f"{source}: timed out after {timeout_s:g} s reading it")
            try:
                polled = consumer.poll(timeout_ms=200)
            except KafkaError as exc:  # READ refused on a topic it may describe
                raise TopicRangeError(f"{source}: {describe_kafka_error(exc, config)}") from None
            for tp, records in polled.items():
                end = bounds[tp][1]
                values[tp].extend(r.value for r in records if r.offset < end)
                if records and records[-1].offset >= end - 1:
                    left.discard(tp)
                    consumer.pause(tp)
    finally:
        consumer.close(autocommit=False)
    all_values = [v for tp in bounds for v in values[tp]]
    decoded = decode_batch(all_values, codec=config.codec, images=images)
    n_invalid = len(all_values) - decoded.n_valid
    if n_invalid:
        logger.warning(
            "%s: %d of %d records do not decode; skipped", source, n_invalid, len(all_values)
        )
    return TopicImages(
        images=decoded.images,
        n_records=len(all_values),
        n_invalid=n_invalid,
        offsets={tp.partition: b for tp, b in bounds.items()},
    )
