"""The private client APIs of streams/client_internals.py exist on the installed versions, which
lie in the ranges pyproject.toml pins: an upgrade that removes one fails here, not in the
worker. The consumer and producer are real ones, connected to the test broker."""

from __future__ import annotations

import importlib.metadata
import logging
import time

import numpy as np
import pytest
from kafka.structs import OffsetAndMetadata, TopicPartition
from packaging.requirements import Requirement
from prometheus_client import CollectorRegistry, Histogram

from streams import client_internals
from streams.kafka_io import create_consumer, create_producer
from tests.fixtures_broker import make_topics


@pytest.mark.parametrize("package", ["kafka-python", "prometheus-client"])
def test_the_installed_client_is_in_the_pinned_range(package: str) -> None:
    requirements = [Requirement(r) for r in importlib.metadata.requires("vaewatch") or []]
    (pinned,) = [r for r in requirements if r.name == package and r.marker is None]
    installed = importlib.metadata.version(package)
    assert pinned.specifier.contains(installed), (package, installed, str(pinned.specifier))


def test_the_consumer_internals_answer_on_a_real_consumer(kafka_broker) -> None:
    topics = make_topics(kafka_broker)
    consumer = create_consumer(config=topics.config)
    try:
        consumer.subscribe([topics.config.input_topic])
        consumer.poll(timeout_ms=2000)
        stable = client_internals.group_stable(consumer)
        assert stable is not None and isinstance(stable(), bool)
        assert client_internals.coordinator_known(consumer) in (True, False)
        assert hasattr(consumer._fetcher, "_next_partition_records")
        record = client_internals.unreadable_record(consumer)  # meaningful after a parse error
        assert record is None or record.topic == topics.config.input_topic
        tp = TopicPartition(topics.config.input_topic, 0)
        offsets = {tp: OffsetAndMetadata(0, "", -1)}

        async def commit() -> None:  # on kafka-python's I/O loop, as inside a listener
            await client_internals.commit_in_listener(consumer, offsets, timeout_ms=5000)

        consumer._coordinator._net.run(commit)
        assert consumer.committed(tp) == 0
    finally:
        consumer.close()


def test_the_producer_can_be_closed_by_force(kafka_broker) -> None:
    topics = make_topics(kafka_broker)
    producer = create_producer(config=topics.config)
    producer.send(topics.config.alert_topic, b"x")
    client_internals.force_close_producer(producer)
    producer.close(timeout=1)


def test_observe_many_equals_one_observe_per_value() -> None:
    registry = CollectorRegistry()
    bulk = Histogram("bulk", "b", buckets=(0.1, 1.0, 10.0), registry=registry)
    single = Histogram("single", "s", buckets=(0.1, 1.0, 10.0), registry=registry)
    values = np.array([0.05, 0.1, 0.5, 1.0, 5.0, 50.0, np.nan, np.inf, -1.0])
    assert hasattr(bulk, "_upper_bounds") and hasattr(bulk, "_buckets")  # the fast path runs
    client_internals.observe_many(bulk, values)
    for value in values[np.isfinite(values)]:
        single.observe(float(value))
    samples = {
        (s.name.replace("single", "bulk"), tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()
        for s in metric.samples
        if s.name.startswith("single") and not s.name.endswith("_created")
    }
    bulk_samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()
        for s in metric.samples
        if s.name.startswith("bulk") and not s.name.endswith("_created")
    }
    assert bulk_samples == pytest.approx(samples)


@pytest.mark.parametrize(("step_s", "warned"), [(0.4, False), (1.5, False), (3.3, True)])
def test_only_an_io_step_that_risks_the_group_is_reported_as_blocking(
    kafka_broker, caplog: pytest.LogCaptureFixture, step_s: float, warned: bool
) -> None:
    """kafka-python warns "Task ... ran for 0.417s (>0.100s threshold). It is blocking the event
    loop" when one step of its I/O loop takes over 0.1 s of wall time, which a busy machine or
    another thread holding the GIL gives any step (the demo showed it to newcomers). vaewatch's
    clients warn when a step took half the session timeout (3 s of the default 6 s), when the
    group membership is at risk."""
    topics = make_topics(kafka_broker)
    assert topics.config.session_timeout_ms == 6000
    consumer = create_consumer(config=topics.config)

    async def slow_step() -> None:  # one step that holds the loop, as a starved thread would
        time.sleep(step_s)

    try:
        with caplog.at_level(logging.WARNING, logger="kafka.net.selector"):
            consumer._coordinator._net.run(slow_step)
    finally:
        consumer.close()
    blocking = [r for r in caplog.records if "blocking the event loop" in r.getMessage()]
    assert bool(blocking) == warned, [r.getMessage() for r in blocking]
