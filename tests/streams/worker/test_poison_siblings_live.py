"""Siblings of the poison records of issue 9, against the real embedded broker and a real
`vaewatch worker`: a tombstone without a key, `id` headers too long for an alert, a dead letter
sent back to the input, absurd timestamps, a non-UTF-8 key and headers that make an alert too
large. Each ends as one score or one dead letter with its reason, every output is strict JSON,
everything is committed, the worker stays up and its latency metric stays sane."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from kafka import KafkaProducer, TopicPartition

from tests.fixtures_broker import StreamTopics, make_topics, metric_value, start_worker
from tests.streams.kafka_helpers import LENIENT_INPUT_TOPIC, read_topic, wait_committed

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
STALE = [
    ("vaewatch.error", b"stale_reason"),
    ("vaewatch.error.detail", b"from an earlier worker"),
    ("vaewatch.source.offset", b"999"),
]


def _strict_json(value: bytes) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in an output: not JSON")

    return json.loads(value, parse_constant=refuse)


def _produce(topics: StreamTopics, records: list[dict]) -> None:
    """Each record a dict of send() arguments, sent in order to partition 0. A record with
    neither key nor value (legal in Kafka, refused by kafka-python's send()) goes straight to
    the producer's record accumulator."""
    producer = KafkaProducer(
        bootstrap_servers=topics.bootstrap_servers,
        acks="all",
        linger_ms=5,
        max_request_size=4 * MIB,
    )
    topic = topics.config.input_topic
    producer.partitions_for(topic)
    futures = []
    for record in records:
        if record.get("value") is None and record.get("key") is None:
            tp = TopicPartition(topic, 0)
            producer._accumulator.append(tp, int(time.time() * 1000), None, None, [])
            continue
        futures.append(producer.send(topic, partition=0, **record))
    producer.flush()
    for future in futures:
        future.get(timeout=20)
    producer.close()


def test_poison_siblings_end_as_one_score_or_one_dead_letter(
    kafka_broker, trained_bundle, tmp_path
) -> None:
    topics = make_topics(kafka_broker, input_configs=LENIENT_INPUT_TOPIC)
    n = 300
    images = np.random.default_rng(3).integers(0, 256, (n, 784), dtype=np.uint8)
    # White images are anomalies for a T-shirt model (random noise mostly is not): these would
    # send an alert as well as a score.
    images[[101, 102, 104, 107]] = 255
    records: list[dict] = [{"value": row.tobytes()} for row in images]
    records[100] = {"value": None}  # a tombstone without a key
    records[101]["headers"] = [("id", b"x" * 600_000)]  # alert: 1.2 MB
    records[102]["headers"] = [("id", b"\xff" * 250_000)]  # 5 bytes of JSON a byte
    records[103] = {"value": b"short", "headers": [*STALE, ("trace", b"t")]}
    records[104]["timestamp_ms"] = -1
    records[105]["timestamp_ms"] = 2**63 - 1
    records[106]["key"] = b"\xff\xfe" * 50
    records[107]["headers"] = [("blob", b"b" * (MIB - 200))]  # fits; its alert does not
    _produce(topics, records)
    expected = {100: "null_value", 101: "bad_id", 102: "bad_id", 103: "wrong_length"}
    expected[107] = "unsendable"

    worker = start_worker(
        model=trained_bundle,
        topics=topics,
        log_dir=tmp_path,
        extra_args=["--set", "stream.max_batch_size=100"],
    )
    try:
        dead = read_topic(topics.config, topics.config.dlq_topic, until=len(expected))
        scores = read_topic(topics.config, topics.config.scores_topic, until=n - len(expected))
        assert wait_committed(topics.config, n, timeout_s=30) == n
        assert worker.process.poll() is None, worker.log()
        text = worker.metrics_text()
        alerts = read_topic(topics.config, topics.config.alert_topic, until=1, timeout_s=10)
    finally:
        assert worker.stop() == 0, worker.log()

    letters: dict[int, list] = {}
    for record in dead:
        letters.setdefault(int(dict(record.headers)["vaewatch.source.offset"]), []).append(record)
    assert {offset: len(copies) for offset, copies in letters.items()} == dict.fromkeys(expected, 1)
    assert {o: dict(c[0].headers)["vaewatch.error"].decode() for o, c in letters.items()} == (
        expected
    )
    assert letters[100][0].value == b"" and letters[100][0].key is None
    names = [name for name, _ in letters[103][0].headers]
    assert names.count("vaewatch.error") == names.count("vaewatch.source.offset") == 1
    assert letters[107][0].value == images[107].tobytes()  # the header went, not the image
    assert b"MessageSizeTooLarge" in dict(letters[107][0].headers)["vaewatch.error.detail"]

    scored = {}
    for record in scores:
        body = _strict_json(record.value)
        scored[body["offset"]] = body
    assert set(scored) == set(range(n)) - set(expected)
    print(
        "ANOM",
        sum(b["anomaly"] for b in scored.values()),
        len(scored),
        sorted(b["score"] for b in scored.values())[:3],
        scored[104]["threshold"],
    )
    assert scored[104]["timestamp_ms"] == -1
    assert scored[105]["timestamp_ms"] == 2**63 - 1
    assert scored[106]["key"] == (b"\xff\xfe" * 50).decode("utf-8", "backslashreplace")
    alerted = {_strict_json(record.value)["offset"]: record for record in alerts}
    assert 104 in alerted and not {101, 102, 107} & set(alerted)

    for reason, count in {"null_value": 1, "bad_id": 2, "wrong_length": 1, "unsendable": 1}.items():
        assert metric_value(text, f'vaewatch_dead_letters_total{{reason="{reason}"}}') == count, (
            reason
        )
    latency_sum = metric_value(text, "vaewatch_end_to_end_latency_seconds_sum")
    latency_count = metric_value(text, "vaewatch_end_to_end_latency_seconds_count")
    assert latency_count >= n - len(expected) - 2
    assert 0 <= latency_sum <= 600 * latency_count, (latency_sum, latency_count)
