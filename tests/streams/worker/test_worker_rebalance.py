"""The worker loop under rebalances (and where a batch's time is counted), broker-free and
deterministic: the real Worker, Delivery, ledger and publisher against the fakes of
tests/streams/fake_kafka.py, which keep a partition's position when an eager rebalance gives it
back to the same member, as kafka-python 3.0 does.

The rule checked at every commit: no committed offset passes a record that has neither a score
nor a dead letter acknowledged by the broker. A property test drives the loop with any sequence
of produced records (some unreadable), acks in any order, rebalances that keep, move or give back
partitions, evictions and kills, with inline and overlapping scoring, and then checks that a
fresh worker drains every partition to its end (nothing stalls)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from detector import Scores
from streams.config import StreamConfig
from streams.worker.loop import Worker, WorkerState
from streams.worker.metrics import WorkerMetrics
from streams.worker.publish import ResultPublisher
from tests.streams.fake_kafka import FakeBroker, FakeConsumer, FakeProducer

IMAGE = bytes(range(256)) * 3 + bytes(16)  # 784 bytes: a valid raw image
BAD = b"not an image"  # dead-lettered by the decoder


class _Pending:
    seconds = 0.0

    def __init__(self, images: np.ndarray, ready: Callable[[], bool]) -> None:
        self._images = images
        self._ready = ready

    def done(self) -> bool:
        return self._ready()

    def result(self) -> Scores:  # the mean pixel, as a stand-in model
        scores = self._images.mean(axis=1).astype(np.float32) / 255.0
        return Scores(scores=scores, p_values=1.0 - scores, anomalous=scores > 0.5)


class FakeScorer:
    """Inline (done at once) or overlapping (done once the test lets batches finish)."""

    description = "fake"

    def __init__(self, *, overlaps: bool) -> None:
        self.overlaps = overlaps
        self.finished = not overlaps

    def submit(self, images: np.ndarray, *, caught_up: bool = False) -> _Pending:
        return _Pending(images, lambda: self.finished or caught_up)

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


class _Killed(BaseException):
    """SIGKILL: the worker stops where it is."""


def _worker(
    broker: FakeBroker,
    config: StreamConfig,
    *,
    overlaps: bool,
    seed: int = 0,
    scorer: FakeScorer | None = None,
    registry: CollectorRegistry | None = None,
    producer: Any = None,
    transactions: Any = None,
):
    """The real worker on the fakes; `producer` and `transactions` stand in for the defaults
    (a FakeProducer, at-least-once)."""
    consumer = FakeConsumer(broker)
    producer = producer or FakeProducer(broker, seed=seed)
    publisher = ResultPublisher(
        producer=producer,
        alert_topic="alerts",
        scores_topic="scores",
        dlq_topic="dlq",
        model_version="v1",
        threshold=0.5,
        scores_format=config.scores_format,
        alert_format=config.alert_format,
    )
    worker = Worker(
        config=config,
        scorer=scorer or FakeScorer(overlaps=overlaps),
        publisher=publisher,
        metrics=WorkerMetrics(registry=registry or CollectorRegistry(), score_buckets=[0.5]),
        consumer=consumer,
        producer=producer,
        state=WorkerState(),
        transactions=transactions,
    )
    return worker, consumer, producer


def _run(
    worker: Worker,
    consumer: FakeConsumer,
    steps: list[Callable[[], None]],
    *,
    settle: Callable[[], None] | None = None,
) -> bool:
    """Run the loop; each poll first takes the next step. When none is left: stop and drain, or
    with `settle`, call it at every poll until the worker has committed its partitions to their
    ends (at most _SETTLE_POLLS polls: a worker that stalls gets no further)."""
    stop = threading.Event()
    poll = consumer.poll
    settling = [0]

    def scripted_poll(timeout_ms: int = 0, max_records: int | None = None) -> dict:
        if steps:
            steps.pop(0)()
        elif settle is None or settling[0] >= _SETTLE_POLLS or _consumed(consumer):
            stop.set()
        else:
            settling[0] += 1
            settle()
        return poll(timeout_ms=timeout_ms, max_records=max_records)

    consumer.poll = scripted_poll  # type: ignore[method-assign]
    return worker.run(stop)


_SETTLE_POLLS = 500


def _consumed(consumer: FakeConsumer) -> bool:
    broker = consumer.broker
    ends = [broker.committed.get(tp, 0) == broker.end(tp) for tp in consumer.position]
    return bool(ends) and all(ends)  # none before the first poll has run the assignment


def _config(**overrides: object) -> StreamConfig:
    base = {
        "input_topic": "images",
        "max_batch_size": 4,
        "max_batch_delay_ms": 60_000,  # partial batches wait in the buffer across polls
        "commit_interval_ms": 0,
        "drain_timeout_s": 1.0,
    }
    return StreamConfig(**(base | overrides))


P0, P1 = TopicPartition("images", 0), TopicPartition("images", 1)


def test_a_partition_given_back_to_its_member_is_consumed_again_from_what_was_committed() -> None:
    """Issue 17's sequence: records in hand at an eager rebalance that gives the member the same
    partitions back. kafka-python keeps the partition's position past them; the worker must not
    then commit past the records it dropped."""
    broker = FakeBroker()
    broker.produce(0, [IMAGE] * 10)
    worker, consumer, producer = _worker(broker, _config(), overlaps=False)
    steps = [
        lambda: None,  # polls offsets 0-9: two batches sent (acks outstanding), 8-9 in hand
        lambda: consumer.rebalance({P0, P1}),  # revoked and given back at once
        lambda: broker.produce(0, [IMAGE] * 6),  # 10-15 arrive after the rebalance
        lambda: producer.ack(),
        lambda: producer.ack(),
    ]
    assert _run(worker, consumer, steps)
    broker.check_commits()
    assert broker.committed[P0] == 16
    assert {o for p, o in broker.covered if p == 0} == set(range(16))


def test_a_partition_paused_by_backpressure_and_given_back_is_consumed_again() -> None:
    """Sibling: kafka-python keeps the paused flag of a partition given back, too."""
    broker = FakeBroker()
    broker.produce(0, [IMAGE] * 12)
    config = _config(max_unacked_records=8, max_batch_delay_ms=0)
    worker, consumer, producer = _worker(broker, config, overlaps=False)
    steps = [lambda: None, lambda: None, lambda: consumer.rebalance({P0})]
    steps += [producer.ack] * 6
    assert _run(worker, consumer, steps)
    assert broker.committed[P0] == 12 and not consumer.paused


def test_records_dead_lettered_and_scored_alike_count_as_covered() -> None:
    broker = FakeBroker(partitions=1)
    broker.produce(0, [IMAGE, BAD, IMAGE, BAD])
    worker, consumer, _ = _worker(broker, _config(), overlaps=False)
    assert _run(worker, consumer, [lambda: None])
    assert broker.committed[P0] == 4 and len(broker.covered) == 4


class _SlowInlineScorer(FakeScorer):
    """Scores in submit(), as the worker's own thread does for a caught-up batch, taking 50 ms."""

    def __init__(self) -> None:
        super().__init__(overlaps=False)

    def submit(self, images: np.ndarray, *, caught_up: bool = False) -> _Pending:
        time.sleep(0.05)
        return super().submit(images, caught_up=caught_up)


def test_a_batch_scored_inline_counts_its_scoring_as_score_not_batching() -> None:
    """vaewatch_stage_seconds: batching ends when the batch is cut from the buffer, before it is
    decoded and scored (it ended after, which put inline scoring under batching)."""
    broker = FakeBroker(partitions=1)
    broker.produce(0, [IMAGE] * 4)  # one batch per poll: none waits while another is scored
    registry = CollectorRegistry()
    config = _config(max_batch_delay_ms=0)
    worker, consumer, producer = _worker(
        broker, config, overlaps=False, scorer=_SlowInlineScorer(), registry=registry
    )
    steps = [lambda: None, lambda: broker.produce(0, [IMAGE] * 4), producer.ack, producer.ack]
    assert _run(worker, consumer, steps)
    seconds = {
        stage: registry.get_sample_value("vaewatch_stage_seconds_sum", {"stage": stage})
        for stage in ("batching", "score")
    }
    assert registry.get_sample_value("vaewatch_stage_seconds_count", {"stage": "score"}) == 2
    assert seconds["score"] >= 2 * 0.05, seconds
    assert seconds["batching"] < 0.05, seconds


# -- the property ----------------------------------------------------------------------------

PARTITIONS = [TopicPartition("images", p) for p in range(3)]
_subsets = st.sets(st.sampled_from(PARTITIONS), min_size=1)
_actions = st.one_of(
    st.tuples(st.just("produce"), st.integers(0, 2), st.integers(1, 7), st.booleans()),
    st.tuples(st.just("ack"), st.sampled_from([0.3, 0.7, 1.0])),
    st.tuples(st.just("finish_scoring")),
    st.tuples(st.just("rebalance"), _subsets),
    st.tuples(st.just("lose"), _subsets),
    st.tuples(st.just("kill")),
    st.tuples(st.just("nothing")),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    actions=st.lists(_actions, max_size=40),
    overlaps=st.booleans(),
    delay_ms=st.sampled_from([0, 60_000]),
    max_unacked=st.sampled_from([3, 8, 8192]),
)
def test_no_commit_passes_an_unscored_record_whatever_the_rebalances(
    actions: list, overlaps: bool, delay_ms: int, max_unacked: int
) -> None:
    broker = FakeBroker(partitions=3)
    config = _config(max_batch_size=3, max_batch_delay_ms=delay_ms, max_unacked_records=max_unacked)
    generation = 0

    while True:
        worker, consumer, producer = _worker(broker, config, overlaps=overlaps, seed=generation)
        scorer = worker.scorer
        steps: list[Callable[[], None]] = []
        killed = False
        while actions and not killed:
            action = actions.pop(0)
            kind = action[0]
            if kind == "produce":
                _, partition, n, bad = action
                values = [BAD if bad and i % 3 == 1 else IMAGE for i in range(n)]
                steps.append(lambda p=partition, v=values: broker.produce(p, v))
            elif kind == "ack":
                steps.append(lambda a=action, p=producer: p.ack(a[1]))
            elif kind == "finish_scoring":
                steps.append(lambda s=scorer: setattr(s, "finished", True))
            elif kind in ("rebalance", "lose"):
                steps.append(lambda a=action, c=consumer: getattr(c, a[0])(a[1]))
            elif kind == "kill":
                steps.append(lambda: (_ for _ in ()).throw(_Killed()))
                killed = True
            else:
                steps.append(lambda: None)

        def settle(s=scorer, p=producer) -> None:
            s.finished = True
            p.ack()

        try:
            _run(worker, consumer, steps, settle=None if killed else settle)
        except _Killed:
            generation += 1
            continue
        break
    broker.check_commits()
    assert _consumed(consumer), broker.committed  # its partitions reached their ends: no stall

    # Whatever happened, a fresh worker drains every partition to its end: nothing stalls.
    worker, consumer, producer = _worker(broker, config, overlaps=False)
    assert _run(worker, consumer, [], settle=producer.ack)
    broker.check_commits()
    assert _consumed(consumer) and set(consumer.position) == set(PARTITIONS)


@pytest.mark.parametrize("overlaps", [False, True])
def test_an_eviction_then_the_same_partitions_back_loses_nothing(overlaps: bool) -> None:
    broker = FakeBroker()
    broker.produce(0, [IMAGE] * 9)
    broker.produce(1, [IMAGE] * 5)
    worker, consumer, producer = _worker(broker, _config(), overlaps=overlaps)
    steps = [
        lambda: None,
        lambda: consumer.lose({P0, P1}),
        lambda: broker.produce(0, [IMAGE] * 3),
        lambda: setattr(worker.scorer, "finished", True),
        producer.ack,
        producer.ack,
    ]
    assert _run(worker, consumer, steps)
    broker.check_commits()
    assert broker.committed == {P0: 12, P1: 5}


def test_a_missing_input_topic_is_named_at_start_and_the_worker_still_subscribes(caplog) -> None:
    broker = FakeBroker(topic="other")
    worker, consumer, _ = _worker(broker, _config(), overlaps=False)
    with caplog.at_level("WARNING", logger="streams.worker.loop"):
        assert _run(worker, consumer, [])
    assert "input topic images has no partitions" in caplog.text
    assert consumer._listener is not None  # subscribed: partitions come once it exists
