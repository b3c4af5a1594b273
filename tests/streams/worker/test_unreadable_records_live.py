"""Input that kafka-python itself cannot read, against the real embedded broker and a real
`vaewatch worker`: a record whose header name is not UTF-8 (other clients, librdkafka for one,
send any bytes) and batches compressed with each codec Kafka has. kafka-python raises on such a
record inside poll() and, asked again, spins on it for ever; the worker dead-letters it (its
coordinates and the error: its bytes cannot be had) and seeks past it, as Kafka's clients leave
to the application. Compressed input is simply scored: the codecs are installed."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from kafka import KafkaProducer, TopicPartition

from tests.fixtures_broker import make_topics, start_worker
from tests.streams.kafka_helpers import read_topic, wait_committed

pytestmark = pytest.mark.slow


class _NotUtf8(str):
    """A header name that kafka-python's producer writes as bytes that are not UTF-8."""

    def encode(self, *args: object, **kwargs: object) -> bytes:
        return b"\xff\xfe-name"


def test_a_record_kafka_python_cannot_read_is_dead_lettered_and_skipped(
    kafka_broker, trained_bundle, tmp_path
) -> None:
    topics = make_topics(kafka_broker)
    config = topics.config
    n, bad = 300, 150
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap_servers, acks="all")
    producer.partitions_for(config.input_topic)
    value = bytes(784)
    for i in range(n):
        if i == bad:  # send() would encode the name itself: append the record as it is
            producer.flush()
            tp = TopicPartition(config.input_topic, 0)
            now_ms = int(time.time() * 1000)
            producer._accumulator.append(tp, now_ms, None, value, [(_NotUtf8("h"), b"v")])
            producer.flush()
        else:
            producer.send(config.input_topic, value=value, partition=0).get(timeout=20)
    producer.close()
    worker = start_worker(
        model=trained_bundle,
        topics=topics,
        log_dir=tmp_path,
        extra_args=["--set", "stream.max_batch_size=100"],
    )
    try:
        assert wait_committed(config, n) == n, worker.log()[-3000:]
        scores = read_topic(config, config.scores_topic, until=n - 1)
        dead = read_topic(config, config.dlq_topic, until=1)
        text = worker.metrics_text()
        assert worker.process.poll() is None
    finally:
        code = worker.stop()
    assert code == 0, worker.log()[-3000:]
    assert {json.loads(r.value)["offset"] for r in scores} == set(range(n)) - {bad}
    (letter,) = dead
    headers = dict(letter.headers)
    assert headers["vaewatch.error"] == b"unreadable"
    assert headers["vaewatch.source.offset"] == str(bad).encode()
    assert b"CorruptRecordError" in headers["vaewatch.error.detail"]
    assert 'vaewatch_dead_letters_total{reason="unreadable"} 1.0' in text


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_compressed_input_is_scored_and_outputs_compressed(
    kafka_broker, trained_bundle, tmp_path, codec: str
) -> None:
    """Input compressed with `codec`; the worker compresses its own outputs with it too."""
    topics = make_topics(kafka_broker)
    config = topics.config
    n = 200
    producer = KafkaProducer(
        bootstrap_servers=topics.bootstrap_servers, acks="all", compression_type=codec
    )
    images = np.random.default_rng(3).integers(0, 256, (n, 784), dtype=np.uint8)
    for image in images:
        producer.send(config.input_topic, value=image.tobytes(), partition=0)
    producer.flush()
    producer.close()
    extra = ["--set", f"stream.compression_type={codec}"]
    worker = start_worker(model=trained_bundle, topics=topics, log_dir=tmp_path, extra_args=extra)
    try:
        assert wait_committed(config, n) == n, worker.log()[-3000:]
        scores = read_topic(config, config.scores_topic, until=n)
    finally:
        code = worker.stop()
    assert code == 0, worker.log()[-3000:]
    assert {json.loads(r.value)["offset"] for r in scores} == set(range(n))
