"""Small real-Kafka helpers for the stream tests: produce, read a topic back, committed offsets.
Each connects with the security settings of the config it is given (plaintext by default)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streams.codec import encode_images
from streams.config import StreamConfig
from streams.kafka_io import security_options
from streams.worker.publish import is_frame, output_values

# Apache Kafka refuses by default a record over about 1 MiB and a timestamp more than an hour
# ahead (Tansu takes both). Topics configured to accept them exist, and the worker must cope with
# their records, so the poison-record tests make their input topic such a topic.
LENIENT_INPUT_TOPIC = {
    "max.message.bytes": str(4 * 1024 * 1024),
    "message.timestamp.after.max.ms": str(2**63 - 1),
    "message.timestamp.before.max.ms": str(2**63 - 1),
}


def produce_values(
    config: StreamConfig,
    values: Sequence[bytes],
    *,
    topic: str | None = None,
    partitions: int = 1,
    headers: Sequence[list[tuple[str, bytes]]] | None = None,
    keys: Sequence[bytes | None] | None = None,
) -> None:
    """Send values round-robin over `partitions` partitions and wait for every ack."""
    producer = KafkaProducer(
        bootstrap_servers=config.bootstrap_servers,
        acks="all",
        linger_ms=5,
        **security_options(config),
    )
    futures = [
        producer.send(
            topic or config.input_topic,
            value=value,
            key=keys[i] if keys is not None else None,
            headers=list(headers[i]) if headers is not None else None,
            partition=i % partitions,
        )
        for i, value in enumerate(values)
    ]
    producer.flush()
    for future in futures:
        future.get(timeout=10)
    producer.close()


def open_reader(
    config: StreamConfig, topic: str, *, isolation_level: str = "read_uncommitted"
) -> KafkaConsumer:
    """A consumer of every partition of `topic` from the start, connected: for `read_topic`."""
    consumer = KafkaConsumer(
        bootstrap_servers=config.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        isolation_level=isolation_level,
        **security_options(config),
    )
    partitions = consumer.partitions_for_topic(topic) or {0}
    consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
    return consumer


def _output_keys(records: list[Any]) -> list[Any]:
    keys: list[Any] = []
    for r in records:
        if is_frame(r.headers):
            lines = map(json.loads, output_values(r.value, r.headers))
            keys += [f"{x['topic']}/{x['partition']}/{x['offset']}".encode() for x in lines]
        else:
            keys.append((r.partition, r.offset) if r.key is None else r.key)
    return keys


def read_topic(
    config: StreamConfig,
    topic: str,
    *,
    until: int,
    timeout_s: float = 60.0,
    isolation_level: str = "read_uncommitted",
    reader: KafkaConsumer | None = None,
) -> list[Any]:
    """All records of `topic` from the start, once records with at least `until` distinct keys
    have been read (or the timeout passed, then whatever came). Worker outputs are keyed
    topic/partition/offset, so duplicates from re-delivery do not count twice; a frame (batch
    format) counts the input records of its lines. `reader`: one `open_reader` connected
    beforehand (closed here), so that the wait starts without the lag of connecting."""
    consumer = reader or open_reader(config, topic, isolation_level=isolation_level)
    records: list[Any] = []
    keys: set[Any] = set()
    deadline = time.monotonic() + timeout_s
    while len(keys) < until and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200, max_records=5000).values():
            records.extend(batch)
            keys.update(_output_keys(batch))
    # A short extra read so that duplicates or extras beyond `until` are seen too.
    for batch in consumer.poll(timeout_ms=300).values():
        records.extend(batch)
    consumer.close()
    return records


def record_count(config: StreamConfig, topic: str) -> int:
    """How many records `topic` holds, from its offsets (Apache Kafka; not Tansu, whose
    ListOffsets is off: see end_offsets). Once the worker has committed its input, every output
    it sent for it is in: a count of 0 proves a topic empty without waiting for nothing."""
    consumer = KafkaConsumer(bootstrap_servers=config.bootstrap_servers, **security_options(config))
    try:
        tps = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or {0})
        ]
        ends, starts = consumer.end_offsets(tps), consumer.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)
    finally:
        consumer.close()


def raw_images(n: int, seed: int = 0) -> list[bytes]:
    """`n` random images as raw-codec record values."""
    images = np.random.default_rng(seed).integers(0, 256, (n, 784), dtype=np.uint8)
    return encode_images(images, codec="raw")


def read_json(records: Sequence[Any]) -> list[dict]:
    return [json.loads(r.value) for r in records]


def committed_offsets(config: StreamConfig, *, partitions: int = 1) -> dict[int, int | None]:
    """The group's committed offset per input partition (read without joining the group)."""
    consumer = KafkaConsumer(
        bootstrap_servers=config.bootstrap_servers,
        group_id=config.group_id,
        enable_auto_commit=False,
        **security_options(config),
    )
    try:
        return {
            p: consumer.committed(TopicPartition(config.input_topic, p)) for p in range(partitions)
        }
    finally:
        consumer.close(autocommit=False)


def wait_committed(config: StreamConfig, offset: int, *, timeout_s: float = 60.0) -> int | None:
    """Wait until the group has committed `offset` on input partition 0; returns what it has
    committed by then."""
    deadline = time.monotonic() + timeout_s
    committed = committed_offsets(config)[0]
    while committed != offset and time.monotonic() < deadline:
        time.sleep(0.3)
        committed = committed_offsets(config)[0]
    return committed


def end_offsets(config: StreamConfig, *, partitions: int = 1) -> dict[int, int]:
    """Last offset + 1 per input partition, found by reading the partition to its end. Only
    for Tansu: its ListOffsets (0.6.0) answers the base offset of the last batch, not the log
    end; Apache Kafka's `end_offsets` is right, and this reads the same value there."""
    consumer = KafkaConsumer(
        bootstrap_servers=config.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        **security_options(config),
    )
    try:
        tps = [TopicPartition(config.input_topic, p) for p in range(partitions)]
        consumer.assign(tps)
        ends = {p: 0 for p in range(partitions)}
        idle = 0
        while idle < 3:
            polled = consumer.poll(timeout_ms=200, max_records=10000)
            idle = 0 if polled else idle + 1
            for tp, records in polled.items():
                ends[tp.partition] = max(ends[tp.partition], records[-1].offset + 1)
        return ends
    finally:
        consumer.close()
