"""Pins the kafka-python behaviour that lost records under rebalances (issue 17), against a real
broker: an eager rebalance that gives a member back a partition it held keeps that partition's
position, so records polled but not committed before the rebalance are not delivered again.
Java's consumer starts such a partition again from the committed offset. The worker copes by
seeking a forgotten partition back to its acknowledged prefix (`Delivery.forget` in
streams/worker/delivery.py); the fakes of tests/streams/fake_kafka.py copy this behaviour, so
that the broker-free tests of test_worker_rebalance.py exercise it. Should a kafka-python release
reset the position, this test fails and says so; the worker's seek stays correct either way."""

from __future__ import annotations

import time

import pytest
from kafka import ConsumerRebalanceListener, KafkaConsumer

from tests.fixtures_broker import make_topics
from tests.streams.kafka_helpers import produce_values, raw_images

pytestmark = pytest.mark.slow


class _Assignments(ConsumerRebalanceListener):
    def __init__(self) -> None:
        self.count = 0

    def on_partitions_revoked(self, revoked) -> None:
        pass

    def on_partitions_assigned(self, assigned) -> None:
        self.count += 1


def _member(config, listener=None) -> KafkaConsumer:
    consumer = KafkaConsumer(
        bootstrap_servers=config.bootstrap_servers,
        group_id=config.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        max_poll_interval_ms=10000,
        fetch_max_wait_ms=50,
    )
    consumer.subscribe([config.input_topic], listener=listener)
    return consumer


def test_kafka_python_keeps_the_position_of_a_partition_given_back(kafka_broker) -> None:
    config = make_topics(kafka_broker, partitions=2).config
    produce_values(config, raw_images(20), partitions=2)
    listener = _Assignments()
    first = _member(config, listener)
    seen = 0
    deadline = time.monotonic() + 60
    while seen < 20 and time.monotonic() < deadline:  # positions 10 and 10, nothing committed
        seen += sum(len(r) for r in first.poll(timeout_ms=200).values())
    assert seen == 20

    second = _member(config)
    again: list[tuple[int, int]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (listener.count >= 2 and second.assignment()):
        for records in first.poll(timeout_ms=100).values():
            again.extend((r.partition, r.offset) for r in records)
        second.poll(timeout_ms=100)
    assert listener.count >= 2 and len(first.assignment()) == 1, "no rebalance happened"
    kept = next(iter(first.assignment())).partition
    for _ in range(10):  # a reset position would deliver offsets 0-9 of `kept` again now
        for records in first.poll(timeout_ms=100).values():
            again.extend((r.partition, r.offset) for r in records)
    first.close(autocommit=False)
    second.close(autocommit=False)
    assert [key for key in again if key[0] == kept] == [], (
        "kafka-python now resets a partition given back to the committed offset"
    )
