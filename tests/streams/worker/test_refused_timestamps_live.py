"""A worker whose clock runs two hours ahead, on Apache Kafka (issue 27): Kafka 4 refuses a
timestamp more than an hour ahead by default (message.timestamp.after.max.ms), so every alert
is refused (INVALID_TIMESTAMP) and replaced by its record's dead letter, while the scores and
dead-letter topics, which allow any timestamp, take the rest. In this process, so that the
worker's outputs get its clock (ResultPublisher's `clock`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from detector import Detector
from streams.codec import encode_images
from streams.kafka_io import create_consumer, create_producer
from streams.worker.loop import Worker, WorkerState
from streams.worker.transactions import TransactionalProducer, start_transactions
from streams.worker_process import build_metrics, publisher_for, scorer_for
from tests.fixtures_broker import StreamTopics, make_topics, metric_value
from tests.fixtures_model import CPU
from tests.streams.kafka_helpers import produce_values, wait_committed
from tests.streams.worker.test_refused_outputs_live import (
    GUARANTEES,
    _aborts,
    _check_scores,
    _letters,
    _refused,
    _scored,
)

pytestmark = pytest.mark.slow

_TWO_HOURS_S = 2 * 3600.0


def _run_in_process(topics: StreamTopics, model: Path, guarantee: str, n: int) -> str:
    """A worker in this process whose clock runs two hours ahead: the timestamps of its
    outputs (and their scored_at_ms) come from it. Returns its metrics, once it has committed
    `n` records."""
    config = topics.config.model_copy(
        update={"processing_guarantee": guarantee, "max_batch_size": 100, "cpu_scoring": "inline"}
    )
    detector = Detector.from_bundle(model, CPU)
    registry = CollectorRegistry()
    metrics = build_metrics(detector=detector, registry=registry)
    consumer = create_consumer(config=config)
    exactly_once = guarantee == "exactly_once"
    producer = TransactionalProducer(config) if exactly_once else create_producer(config=config)
    transactions = None
    if exactly_once:
        transactions = start_transactions(
            producer=producer, consumer=consumer, config=config, metrics=metrics
        )
    publisher = publisher_for(
        config, detector=detector, producer=producer, clock=lambda: time.time() + _TWO_HOURS_S
    )
    worker = Worker(
        config=config,
        scorer=scorer_for(config, detector=detector, metrics=metrics),
        publisher=publisher,
        metrics=metrics,
        consumer=consumer,
        producer=producer,
        state=WorkerState(model_loaded=lambda: True),
        transactions=transactions,
    )
    stop = threading.Event()
    finished: list[bool] = []
    thread = threading.Thread(target=lambda: finished.append(worker.run(stop)))
    thread.start()
    try:
        assert wait_committed(config, n, timeout_s=120) == n
    finally:
        stop.set()
        thread.join(60)
        consumer.close()
        producer.close(timeout=5)
    assert finished == [True]
    return generate_latest(registry).decode()


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_alerts_stamped_by_a_clock_two_hours_ahead_become_dead_letters(
    guarantee: str, kafka_broker, trained_bundle: Path
) -> None:
    lenient = {"message.timestamp.after.max.ms": str(2**63 - 1)}
    topics = make_topics(
        kafka_broker, output_configs={"scores_topic": lenient, "dlq_topic": lenient}
    )
    config = topics.config
    n = 300
    images = np.random.default_rng(5).integers(0, 256, (n, 784), dtype=np.uint8)
    white = [50, 150, 250]
    images[white] = 255  # anomalies for a T-shirt model
    produce_values(config, encode_images(images, codec="raw"))
    text = _run_in_process(topics, trained_bundle, guarantee, n)
    _check_scores(_scored(topics, n), set(range(n)), guarantee)
    letters = _letters(topics, len(white))
    assert set(white) <= set(letters), sorted(letters)
    for copies in letters.values():
        headers = dict(copies[0].headers)
        assert headers["vaewatch.error"] == b"unsendable"
        # kafka-python names several refused records of one batch InvalidRecordError
        assert b"Timestamp" in headers["vaewatch.error.detail"]
        assert len(copies) == 1 or guarantee == "at_least_once"
    assert _refused(text, "alert", "invalid_timestamp") == len(letters)
    assert metric_value(text, "vaewatch_alerts_published_total") == 0
    if guarantee == "exactly_once":
        assert _aborts(text) >= 1
