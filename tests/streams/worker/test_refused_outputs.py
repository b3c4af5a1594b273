"""Refused outputs (issue 27) with the real worker loop against broker-free fakes, deterministic:
topics that refuse what the test says with kafka-python's own exceptions, among them a topic an
ACL denies (TopicAuthorizationFailedError; the live test of that needs a broker with an
authorizer), in both guarantees. The producer fake behaves as kafka-python 3.0 does where the
worker depends on it: a refused record's batch-mates fail with a bare KafkaError, and in a
transaction one refusal fails the sends still waiting with the same exception (aborted by the
client) and every later send until the transaction ends."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from kafka.errors import (
    InvalidRecordError,
    KafkaError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
)
from prometheus_client import CollectorRegistry

from streams.worker.loop import Worker
from streams.worker.output_refusals import TOPIC_REFUSAL_S, OutputRefusals
from tests.streams.fake_kafka import FakeBroker, FakeConsumer
from tests.streams.worker.test_worker_rebalance import P0, _config, _run
from tests.streams.worker.test_worker_rebalance import _worker as worker_on_fakes

DARK = bytes(784)  # mean pixel 0: normal for the stand-in model (tests/.../test_worker_rebalance)
BRIGHT = bytes([255]) * 784  # an anomaly: an alert as well as a score
BAD = b"not an image"
Refuse = Callable[[str, bytes | None, bytes | None], BaseException | None]


class _Aborted:
    """What kafka-python's client-aborted batch leaves on a future (base offset -1)."""

    value = (-1, -1, None)


class _NeverAnswered:
    """The produce result behind a send kafka-python failed before it took the record."""

    is_done = False
    value = None


class _Sent:
    def __init__(self, topic: str, value: bytes | None, key: bytes | None, headers: list) -> None:
        self.message = (topic, value, headers)
        self.key = key
        self.is_done = False
        self.exception: BaseException | None = None
        self._produce_future: Any = None

    def failed(self) -> bool:
        return self.exception is not None


class RefusingProducer:
    """Sends are answered at `flush()` (the worker's flush, or a test step), in order, one
    producer batch per topic: a send `refuse` names fails with that exception, and (invalid
    records only) its batch-mates with kafka-python's bare KafkaError. `transactional`: outputs
    reach the broker only when `FakeTransactions` commits, and a refusal dooms the transaction
    as described above."""

    def __init__(
        self,
        broker: FakeBroker,
        refuse: Refuse,
        *,
        transactional: bool = False,
        denied_in_metadata: frozenset[str] = frozenset(),
    ) -> None:
        self.broker = broker
        self.refuse = refuse
        self.transactional = transactional
        # Topics whose metadata the broker refuses (no DESCRIBE nor WRITE ACL): kafka-python's
        # send() asks for their metadata, about one round trip each time, and returns a future
        # failed already, without touching the transaction.
        self.denied_in_metadata = denied_in_metadata
        self.pending: list[_Sent] = []
        self.staged: list[tuple] = []
        self.doomed: BaseException | None = None
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []  # (topic, value, key)

    def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def send(self, topic, value=None, key=None, headers=None, partition=None, timestamp_ms=None):
        if self.doomed is not None:
            raise KafkaError(
                "Cannot perform send because at least one previous transactional or idempotent "
                "request has failed with errors.",
                self.doomed,
            )
        self.sent.append((topic, value, key))
        sent = _Sent(topic, value, key, list(headers or []))
        if topic in self.denied_in_metadata:
            sent.is_done, sent.exception = True, TopicAuthorizationFailedError({topic})
            sent._produce_future = _NeverAnswered()
            return sent
        self.pending.append(sent)
        return sent

    def flush(self, timeout: float | None = None) -> None:
        pending, self.pending = self.pending, []
        by_topic: dict[str, list[_Sent]] = {}
        for sent in pending:
            by_topic.setdefault(sent.message[0], []).append(sent)
        for batch in by_topic.values():
            refused = {id(s): self.refuse(s.message[0], s.message[1], s.key) for s in batch}
            record_errors = any(isinstance(e, InvalidRecordError) for e in refused.values())
            for sent in batch:
                sent.is_done = True
                if self.doomed is not None:
                    sent.exception, sent._produce_future = self.doomed, _Aborted()
                elif refused[id(sent)] is not None:
                    sent.exception = refused[id(sent)]
                    if self.transactional:
                        self.doomed = sent.exception
                elif record_errors:
                    sent.exception = KafkaError(
                        "Failed to append record because it was part of a batch which had one "
                        "more more invalid records"
                    )
                elif self.transactional:
                    self.staged.append(sent.message)
                else:
                    self.broker.accept(*sent.message)

    ack = flush


class FakeTransactions:
    """The worker's Transactions against the fakes: the outputs and the offsets reach the broker
    together at the commit, or never."""

    def __init__(self, producer: RefusingProducer) -> None:
        self.producer = producer
        self.open = False
        self.aborts = 0

    def begin(self) -> None:
        self.open = True

    def due(self) -> bool:
        return self.open

    def commit(self, offsets: dict, *, timeout_s: float) -> None:
        self.producer.flush()
        if self.producer.doomed is not None:
            raise KafkaError(f"the transaction failed: {self.producer.doomed}")
        for message in self.producer.staged:
            self.producer.broker.accept(*message)
        if offsets:
            self.producer.broker.commit(offsets)
        self.producer.staged = []
        self.open = False

    def abort(
        self, reason: object, *, timeout_s: float, renew: bool = False, cause: object = None
    ) -> None:
        if self.open:
            self.open = False
            self.aborts += 1
            self.producer.staged, self.producer.doomed = [], None
            self.producer.pending = []

    def recover(self, failed: KafkaError) -> None:
        raise failed


def _worker(
    broker: FakeBroker,
    refuse: Refuse,
    *,
    exactly_once: bool = False,
    denied_in_metadata: frozenset[str] = frozenset(),
    **settings: object,
) -> tuple[Worker, FakeConsumer, RefusingProducer, CollectorRegistry, FakeTransactions | None]:
    producer = RefusingProducer(
        broker, refuse, transactional=exactly_once, denied_in_metadata=denied_in_metadata
    )
    transactions = FakeTransactions(producer) if exactly_once else None
    registry = CollectorRegistry()
    worker, consumer, _ = worker_on_fakes(
        broker,
        _config(**settings),
        overlaps=False,
        registry=registry,
        producer=producer,
        transactions=transactions,
    )
    return worker, consumer, producer, registry, transactions


def _refused(registry: CollectorRegistry, output: str, reason: str) -> float:
    labels = {"output": output, "reason": reason}
    return registry.get_sample_value("vaewatch_outputs_refused_total", labels) or 0.0


def _outputs(broker: FakeBroker, topic: str) -> list[dict[str, bytes]]:
    return [dict(headers) for t, _, headers in broker.outputs if t == topic]


def _size_limit(topic: str, limit: int = 4096) -> Refuse:
    """A topic whose max.message.bytes is `limit`."""
    return lambda t, value, key: (
        MessageSizeTooLargeError() if t == topic and len(value or b"") > limit else None
    )


def _line_offsets(broker: FakeBroker, topic: str) -> list[int]:
    """The input offsets of the objects on `topic`, framed or not, sorted."""
    return sorted(
        json.loads(line)["offset"]
        for t, value, _ in broker.outputs
        if t == topic
        for line in value.splitlines()
    )


def _deny(topic: str) -> Refuse:
    """An ACL that denies writing to `topic`."""
    return lambda t, value, key: TopicAuthorizationFailedError(t) if t == topic else None


GUARANTEES = [False, True]


@pytest.mark.parametrize("exactly_once", GUARANTEES)
@pytest.mark.parametrize("alert_format", ["record", "batch"])
def test_an_alert_topic_the_acls_deny_turns_alerts_into_dead_letters(
    exactly_once: bool, alert_format: str
) -> None:
    broker = FakeBroker(partitions=1)
    values = [DARK, BRIGHT, DARK, BRIGHT, BAD, DARK, BRIGHT, DARK]
    broker.produce(0, values)
    worker, consumer, producer, registry, transactions = _worker(
        broker, _deny("alerts"), exactly_once=exactly_once, alert_format=alert_format
    )
    assert _run(worker, consumer, [], settle=producer.flush)
    assert broker.committed[P0] == len(values)
    broker.check_commits()
    assert _outputs(broker, "alerts") == []
    letters = {int(h["vaewatch.source.offset"]): h for h in _outputs(broker, "dlq")}
    assert sorted(letters) == [1, 3, 4, 6]
    assert {o: h["vaewatch.error"] for o, h in letters.items()} == {
        1: b"unsendable",
        3: b"unsendable",
        4: b"wrong_length",
        6: b"unsendable",
    }
    assert b"TopicAuthorizationFailed" in letters[1]["vaewatch.error.detail"]
    assert len(_outputs(broker, "scores")) == len(values) - 1  # every record scored once
    # one refusal per message: an alert each, or a frame per batch (two batches of four)
    assert _refused(registry, "alert", "not_authorized") == (3 if alert_format == "record" else 2)
    assert registry.get_sample_value("vaewatch_alerts_published_total") == 0
    # The topic refuses any alert: for a while the others are not even tried, and exactly once
    # aborts one transaction, not one per transaction holding an alert.
    assert [t for t, _, _ in producer.sent].count("alerts") <= 3
    if transactions is not None:
        assert transactions.aborts == 1


@pytest.mark.parametrize("exactly_once", GUARANTEES)
def test_a_topic_whose_metadata_is_denied_is_tried_once_per_batch_not_once_per_output(
    exactly_once: bool,
) -> None:
    """Found with the secured broker: kafka-python's send() to a topic the ACLs hide waits for a
    metadata answer each time (about 0.1 s) before it returns a failed future. A batch of 200
    anomalies sent 200 alerts that way: the loop stalled 20 s, past max_poll_interval_ms (the
    group evicted the worker) and past the transaction timeout. The first refusal now stops the
    batch's other sends to that topic. Such a send never joined the transaction: exactly-once
    replaces it inside the same one, without an abort."""
    broker = FakeBroker(partitions=1)
    values = [BRIGHT] * 12
    broker.produce(0, values)
    worker, consumer, producer, registry, transactions = _worker(
        broker,
        lambda topic, value, key: None,
        exactly_once=exactly_once,
        denied_in_metadata=frozenset({"alerts"}),
        max_batch_size=12,
    )
    assert _run(worker, consumer, [], settle=producer.flush)
    assert broker.committed[P0] == len(values)
    assert [t for t, _, _ in producer.sent].count("alerts") == 1
    letters = {int(h["vaewatch.source.offset"]): h for h in _outputs(broker, "dlq")}
    assert sorted(letters) == list(range(len(values)))
    assert len(_outputs(broker, "scores")) == len(values)
    assert _refused(registry, "alert", "not_authorized") == len(values)
    if transactions is not None:
        assert transactions.aborts == 0


def test_a_topic_that_refused_any_output_is_tried_again_after_a_while() -> None:
    now = [0.0]
    refusals = OutputRefusals(clock=lambda: now[0])
    denied = TopicAuthorizationFailedError("alerts")
    refusals.refuse_topic("alerts", denied)
    assert refusals.holds_outputs and refusals.topic_refused("alerts") is denied
    assert refusals.topic_refused("scores") is None
    now[0] = TOPIC_REFUSAL_S
    assert refusals.topic_refused("alerts") is None and not refusals.holds_outputs


@pytest.mark.parametrize("exactly_once", GUARANTEES)
@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_dead_letter_topic_the_acls_deny_ends_by_the_policy_without_a_second_try(
    exactly_once: bool, policy: str
) -> None:
    broker = FakeBroker(partitions=1)
    values = [DARK, DARK, BAD, DARK, DARK]
    broker.produce(0, values)
    worker, consumer, producer, registry, transactions = _worker(
        broker,
        _deny("dlq"),
        exactly_once=exactly_once,
        on_unsendable=policy,
        commit_interval_ms=0,
    )
    if policy == "skip":
        broker.covered.add((0, 2))  # committed without its outputs: what skip trades for progress
    completed = _run(worker, consumer, [], settle=producer.flush)
    tried = [t for t, _, _ in producer.sent if t == "dlq"]
    assert len(tried) == 1  # the dead letter; no copy to a topic that refuses them all
    assert _refused(registry, "dead_letter", "not_authorized") == 1
    if policy == "fail":
        assert not completed
        assert broker.committed.get(P0, 0) <= 2  # never past the record
    else:
        assert completed and broker.committed[P0] == len(values)
        assert registry.get_sample_value("vaewatch_errors_total", {"kind": "skipped"}) == 1
    if transactions is not None:  # under fail, stopping aborts the redo as well
        assert transactions.aborts == (2 if policy == "fail" else 1)


def test_the_batch_mates_of_a_refused_record_are_sent_again_not_dead_lettered() -> None:
    """A compacted dead-letter topic refuses a keyless dead letter (INVALID_RECORD); the other
    dead letter of the same producer batch fails with kafka-python's bare KafkaError and is
    sent again as it was."""
    broker = FakeBroker(partitions=1)
    broker.produce(0, [DARK, BAD, DARK, BAD])
    refuse: Refuse = lambda topic, value, key: (  # noqa: E731
        InvalidRecordError("Compacted topic cannot accept message without key")
        if topic == "dlq" and key is None
        else None
    )
    consumer_key = {3: b"k"}
    broker_logs = broker.logs[P0]
    worker, consumer, producer, registry, _ = _worker(broker, refuse)
    # the fake consumer's records have no key: give record 3 one
    poll = consumer.poll

    def keyed_poll(timeout_ms: int = 0, max_records: int | None = None) -> dict:
        polled = poll(timeout_ms=timeout_ms, max_records=max_records)
        return {
            tp: [r._replace(key=consumer_key.get(r.offset)) for r in records]
            for tp, records in polled.items()
        }

    consumer.poll = keyed_poll  # type: ignore[method-assign]
    assert _run(worker, consumer, [], settle=producer.flush)
    assert broker.committed[P0] == len(broker_logs)
    letters = {int(h["vaewatch.source.offset"]): h for h in _outputs(broker, "dlq")}
    assert letters[3]["vaewatch.error"] == b"wrong_length"  # sent again, as it was
    assert letters[1]["vaewatch.error"] == b"unsendable"
    assert letters[1]["vaewatch.error.detail"].startswith(b"wrong_length, then InvalidRecord")
    keys = [key for topic, _, key in producer.sent if topic == "dlq"]
    assert keys.count(b"images/0/1") == 1  # the copy is keyed: the topic takes it
    assert _refused(registry, "dead_letter", "invalid_record") == 1


def test_exactly_once_a_dead_letter_too_large_aborts_once_and_the_redo_sends_it_bare() -> None:
    broker = FakeBroker(partitions=1)
    values = [DARK] * 5 + [b"\x01" * 20_000] + [DARK, BRIGHT, DARK]
    broker.produce(0, values)
    worker, consumer, producer, registry, transactions = _worker(
        broker, _size_limit("dlq"), exactly_once=True
    )
    assert _run(worker, consumer, [], settle=producer.flush)
    assert transactions is not None and transactions.aborts == 1
    assert broker.committed[P0] == len(values)
    broker.check_commits()
    (letter,) = _outputs(broker, "dlq")
    assert (
        letter["vaewatch.error"] == b"unsendable" and letter["vaewatch.original.size"] == b"20000"
    )
    bare = [v for t, v, _ in producer.sent if t == "dlq"]
    assert [len(v or b"") for v in bare] == [20_000, 0]  # refused once, then sent bare
    assert len(_outputs(broker, "scores")) == len(values) - 1
    assert len(_outputs(broker, "alerts")) == 1
    assert _refused(registry, "dead_letter", "too_large") == 1


def test_exactly_once_a_scores_frame_too_large_costs_one_abort_not_one_per_guess() -> None:
    """Scores frames of 100 lines (about 27 KB) against a 4,096-byte topic: the frame size is
    learnt at the refusal (an eighth of the refused frame), so the next batches' frames fit.
    Learnt at the redo and halved it took an abort per guess (15 aborts in a live run)."""
    broker = FakeBroker(partitions=1)
    values = [DARK] * 600
    broker.produce(0, values)
    worker, consumer, producer, _, transactions = _worker(
        broker, _size_limit("scores"), exactly_once=True, scores_format="batch", max_batch_size=100
    )
    assert _run(worker, consumer, [], settle=producer.flush)
    assert transactions is not None and transactions.aborts == 1
    assert broker.committed[P0] == len(values)
    assert _line_offsets(broker, "scores") == list(range(len(values)))


@pytest.mark.parametrize("exactly_once", GUARANTEES)
def test_an_alert_frame_too_large_is_sent_again_line_by_line(exactly_once: bool) -> None:
    """stream.alert_format=batch against an alert topic that takes 4,096 bytes: the first frame
    (100 alerts, about 27 KB) is refused and sent again as one message per alert; the later
    frames are cut to fit. Every alert arrives, none is dead-lettered, every one counts."""
    broker = FakeBroker(partitions=1)
    values = [BRIGHT] * 300
    broker.produce(0, values)
    worker, consumer, producer, registry, transactions = _worker(
        broker,
        _size_limit("alerts"),
        exactly_once=exactly_once,
        alert_format="batch",
        max_batch_size=100,
    )
    assert _run(worker, consumer, [], settle=producer.flush)
    assert broker.committed[P0] == len(values)
    assert _line_offsets(broker, "alerts") == list(range(len(values)))
    assert _outputs(broker, "dlq") == []
    assert registry.get_sample_value("vaewatch_alerts_published_total") == len(values)
    if transactions is not None:
        assert transactions.aborts == 1
        assert _refused(registry, "alert", "too_large") == 1
    else:  # the batches built before the first refusal was answered have frames as large
        assert 1 <= _refused(registry, "alert", "too_large") <= 3
