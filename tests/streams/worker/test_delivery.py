"""The batches' owner's commit accounting (streams.worker.delivery): an offset counts as committed
only once the broker has accepted its commit, so a refused asynchronous commit is sent again, by
the next timer commit or by the shutdown's, and the exit code never claims a commit that did not
happen. The consumer here only records the two commit calls the owner makes, so that the test
can answer them; the commit path against the real broker is covered by the live worker tests."""

from __future__ import annotations

from collections import namedtuple

import pytest
from kafka.errors import CommitFailedError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import CollectorRegistry

from streams.config import StreamConfig
from streams.worker.batch import all_invalid
from streams.worker.delivery import Delivery
from streams.worker.metrics import WorkerMetrics
from streams.worker.state import WorkerState
from streams.worker.transactions import TransactionsUnavailableError, start_transactions

TP = TopicPartition("in", 0)
Record = namedtuple("Record", "topic partition offset value")


class RecordingConsumer:
    def __init__(self) -> None:
        self.async_commits: list[tuple[dict, object]] = []
        self.sync_commits: list[dict] = []

    def commit_async(self, *, offsets, callback) -> None:
        self.async_commits.append((offsets, callback))

    def commit(self, *, offsets, timeout_ms) -> None:
        self.sync_commits.append(offsets)


def _tracker(consumer: RecordingConsumer, errors: list) -> Delivery:
    return Delivery(
        config=StreamConfig(),
        consumer=consumer,
        producer=None,
        metrics=WorkerMetrics(registry=CollectorRegistry(), score_buckets=[1.0]),
        state=WorkerState(assigned={TP}),
        on_error=lambda kind, exc: errors.append(kind),
    )


def _acknowledged_batch(tracker: Delivery, first: int, end: int) -> None:
    records = [Record("in", 0, o, b"x") for o in range(first, end)]
    decoded = all_invalid(len(records), "bad_image", ValueError("unused"))
    batch = tracker.open(records, decoded, None, publisher=None, polled_at=0.0, cut_at=0.0)
    tracker.ledger.acknowledge(batch.batch_id)


def test_a_refused_async_commit_is_committed_again_at_shutdown() -> None:
    consumer, errors = RecordingConsumer(), []
    tracker = _tracker(consumer, errors)
    _acknowledged_batch(tracker, 0, 10)
    assert tracker.commit()
    offsets, callback = consumer.async_commits[-1]
    callback(offsets, CommitFailedError("the group rebalanced"))
    assert errors == ["commit"]
    assert tracker.ledger.committable({TP}) == {TP: 10}  # not counted as committed
    assert tracker.commit(timeout_s=1.0)
    assert consumer.sync_commits == [{TP: OffsetAndMetadata(10, "", -1)}]
    assert tracker.ledger.committable({TP}) == {}


def test_an_accepted_async_commit_is_not_sent_again_and_a_late_answer_does_not_undo_it() -> None:
    consumer, errors = RecordingConsumer(), []
    tracker = _tracker(consumer, errors)
    _acknowledged_batch(tracker, 0, 10)
    tracker.commit()
    _acknowledged_batch(tracker, 10, 20)
    tracker.commit()
    (old, old_callback), (new, new_callback) = consumer.async_commits
    new_callback(new, object())
    old_callback(old, object())  # the older commit's answer arrives last
    assert tracker.ledger.committed(TP) == 20
    assert tracker.commit(timeout_s=1.0) and consumer.sync_commits == []
    assert errors == []


def test_a_broker_without_transactions_is_a_one_line_error_naming_the_setting() -> None:
    class NoTransactions:  # what kafka-python raises when InitProducerId never succeeds
        def init_transactions(self) -> None:
            raise KafkaTimeoutError("Timeout expired while initializing transactional state")

    with pytest.raises(TransactionsUnavailableError) as raised:
        start_transactions(
            producer=NoTransactions(),
            consumer=None,
            config=StreamConfig(processing_guarantee="exactly_once"),
            metrics=WorkerMetrics(registry=CollectorRegistry(), score_buckets=[1.0]),
        )
    message = str(raised.value)
    assert "\n" not in message
    assert "stream.processing_guarantee=exactly_once" in message and "KafkaTimeoutError" in message
