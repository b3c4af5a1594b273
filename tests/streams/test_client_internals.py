"""The private client APIs of streams/client_internals.py exist on the installed versions, which
lie in the ranges pyproject.toml pins: an upgrade that removes one fails here, not in the
worker. The consumer and producer are real ones, connected to the test broker."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import signal
import time
from typing import Any

import numpy as np
import pytest
from kafka import KafkaProducer
from kafka.errors import (
    InvalidRecordError,
    InvalidTimestampError,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumberError,
    TopicAuthorizationFailedError,
)
from kafka.producer.transaction_manager import TransactionManager
from kafka.structs import OffsetAndMetadata, TopicPartition
from packaging.requirements import Requirement
from prometheus_client import CollectorRegistry, Histogram

from streams import client_internals
from streams.config import StreamConfig
from streams.kafka_io import create_consumer, create_producer, ensure_topics
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


# -- kafka-python behaviour the worker works around (issue 27) ---------------------------------

_SMALL_TOPIC = {"max.message.bytes": "4096"}
_TOO_LARGE_FOR_IT = b"x" * 20_000  # under max_request_size, over the topic's limit


def _small_and_plain_topics(kafka_broker) -> tuple[str, str, str]:
    topics = make_topics(kafka_broker)
    small = f"{topics.config.input_topic}.small"
    ensure_topics(config=topics.config, topics=[small], configs=_SMALL_TOPIC)
    return topics.bootstrap_servers, small, topics.config.alert_topic


def _refused_in_a_transaction(kafka_broker, name: str) -> tuple[KafkaProducer, str, Any]:
    """A transactional producer that has sent the small topic a record too large for it (a
    full batch: sent at once), and that record's future."""
    servers, small, plain = _small_and_plain_topics(kafka_broker)
    producer = KafkaProducer(bootstrap_servers=servers, transactional_id=f"{plain}-{name}")
    producer.init_transactions()
    producer.begin_transaction()
    return producer, small, producer.send(small, _TOO_LARGE_FOR_IT, partition=0)


def test_kafka_pythons_idempotent_producer_dies_of_one_refused_record(kafka_broker) -> None:
    """The pin of create_producer's enable_idempotence=False (at-least-once). kafka-python
    3.0.12 classifies a non-retriable broker error on an idempotent, non-transactional producer
    as FATAL (TransactionManager.classify_batch_error; the comment above it says such a batch
    should just fail): every later send fails with the refused record's error, whatever its
    topic. When this test fails, a release fixed it: the worker's producer may be idempotent
    again."""
    servers, small, plain = _small_and_plain_topics(kafka_broker)
    idempotent = KafkaProducer(bootstrap_servers=servers, enable_idempotence=True, acks="all")
    try:
        refused = idempotent.send(small, _TOO_LARGE_FOR_IT)
        with pytest.raises(MessageSizeTooLargeError):
            refused.get(timeout=20)
        innocent = idempotent.send(plain, b"a small record for another topic")
        with pytest.raises(MessageSizeTooLargeError):
            innocent.get(timeout=20)
    finally:
        client_internals.force_close_producer(idempotent)
        idempotent.close(timeout=1)
    manager = TransactionManager(transactional_id=None, api_version=(4, 0))
    for error in (InvalidRecordError, InvalidTimestampError, TopicAuthorizationFailedError):
        assert manager.classify_batch_error(error, None) == TransactionManager.ERROR_CLASS_FATAL


def test_the_worker_producer_fails_only_the_refused_record(kafka_broker) -> None:
    """What the worker's at-least-once producer does instead: the refused record fails alone,
    the producer stays usable."""
    servers, small, plain = _small_and_plain_topics(kafka_broker)
    producer = create_producer(config=StreamConfig(bootstrap_servers=servers))
    try:
        refused = producer.send(small, _TOO_LARGE_FOR_IT)
        fine = producer.send(plain, b"a batch-mate")
        with pytest.raises(MessageSizeTooLargeError):
            refused.get(timeout=20)
        fine.get(timeout=20)
        producer.send(plain, b"a later record").get(timeout=20)
    finally:
        producer.close(timeout=5)


def test_a_failed_transaction_fails_the_waiting_batches_with_the_refused_records_error(
    kafka_broker,
) -> None:
    """In a transaction, the batches still waiting in the producer when one is refused fail
    with that batch's own exception: only client_internals.aborted_by_client tells them apart.
    The waiting one is queued behind the refused one on its partition (a transactional producer
    sends one batch per partition at a time)."""
    producer, small, refused = _refused_in_a_transaction(kafka_broker, "pin")
    try:
        waiting = producer.send(small, b"a record the topic takes", partition=0)
        with pytest.raises(MessageSizeTooLargeError):
            refused.get(timeout=20)
        with pytest.raises(MessageSizeTooLargeError):
            waiting.get(timeout=20)
        assert not client_internals.aborted_by_client(refused)
        assert client_internals.aborted_by_client(waiting)
        assert client_internals.fatal_error(producer) is None  # abortable, not fatal
        producer.abort_transaction()
    finally:
        producer.close(timeout=5)


def test_after_a_refused_batch_the_partitions_next_transaction_fails(kafka_broker) -> None:
    """The pin of renewing the producer to abort a transaction a refused send doomed
    (KAFKA_PYTHON_SEQUENCE_GAP): kafka-python 3.0.12 keeps the sequence number the refused
    batch took, so the next batch on that partition, in the next transaction, fails with
    OUT_OF_ORDER_SEQUENCE_NUMBER (Java's producer takes the number back). When this test
    fails, plain abort_transaction suffices again."""
    producer, small, refused = _refused_in_a_transaction(kafka_broker, "gap")
    try:
        with pytest.raises(MessageSizeTooLargeError):
            refused.get(timeout=20)
        producer.abort_transaction()
        producer.begin_transaction()
        later = producer.send(small, b"a record the topic takes", partition=0)
        with pytest.raises(OutOfOrderSequenceNumberError):
            later.get(timeout=20)
    finally:
        client_internals.force_close_producer(producer)
        producer.close(timeout=1)


def test_a_fenced_producer_is_fatal(kafka_broker) -> None:
    servers, _, plain = _small_and_plain_topics(kafka_broker)
    first = KafkaProducer(bootstrap_servers=servers, transactional_id=f"{plain}-fenced")
    second = KafkaProducer(bootstrap_servers=servers, transactional_id=f"{plain}-fenced")
    try:
        first.init_transactions()
        second.init_transactions()  # fences the first
        first.begin_transaction()
        first.send(plain, b"from a zombie")
        with pytest.raises(KafkaError):
            first.commit_transaction()
        assert isinstance(client_internals.fatal_error(first), KafkaError)
        assert client_internals.fatal_error(second) is None
    finally:
        client_internals.force_close_producer(first)
        first.close(timeout=1)
        second.close(timeout=5)


def _polls_without_waiting(producer: KafkaProducer, broker: Any, topic: str) -> int:
    """How many times the producer's sender polled with a 0 ms timeout in one second, with more
    requests than max_in_flight_requests_per_connection sent to a broker frozen by SIGSTOP."""
    producer.send(topic, b"connected").get(timeout=20)
    client = producer._sender._client
    real_poll = client.poll
    zero = [0]

    def poll(timeout_ms: float | None = None, future: Any = None) -> Any:
        zero[0] += timeout_ms == 0
        return real_poll(timeout_ms=timeout_ms, future=future)

    client.poll = poll
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        for _ in range(8):  # one request each: more than the 5 a connection may have unanswered
            producer.send(topic, b"x" * 100)
            time.sleep(0.02)
        zero[0] = 0
        time.sleep(1.0)
        return zero[0]
    finally:
        os.kill(broker.pid, signal.SIGCONT)
        client_internals.force_close_producer(producer)
        producer.close(timeout=1)


def test_kafka_pythons_sender_spins_at_max_in_flight(kafka_broker) -> None:
    """The pin of SENDER_SPINS_AT_MAX_IN_FLIGHT: kafka-python 3.0.12's own client polls without
    waiting while a connection is at its limit of unanswered requests (connection_delay is 0 for
    a connected node). When this test fails, a release fixed it and _WaitingNetClient can go."""
    topic = make_topics(kafka_broker).config.input_topic
    producer = KafkaProducer(
        bootstrap_servers=kafka_broker.bootstrap_servers, enable_idempotence=False, linger_ms=0
    )
    assert _polls_without_waiting(producer, kafka_broker, topic) > 200


def test_the_worker_producer_waits_for_an_answer_at_max_in_flight(kafka_broker) -> None:
    """The busy loop held the GIL: a worker's shutdown against a frozen broker overran
    drain_timeout_s by a second (test_worker_faults.py). The worker's producer waits instead."""
    config = make_topics(kafka_broker).config
    producer = create_producer(config=config.model_copy(update={"linger_ms": 0}))
    assert _polls_without_waiting(producer, kafka_broker, config.input_topic) < 20
