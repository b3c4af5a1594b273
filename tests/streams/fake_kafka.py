"""A broker-free stand-in for kafka-python 3.0's consumer and producer, for deterministic tests of
the worker's delivery bookkeeping (a poll, a rebalance, an ack at a chosen moment). Live tests
run the same paths against a real broker; what these fakes promise is checked against the real
library in tests/streams/worker/test_rebalance_live.py.

What they copy from kafka-python 3.0.12 on purpose, because the worker's correctness depends on
it:
- `poll()` advances a partition's position past the records it returns (the consumer's position,
  not the committed offset);
- a rebalance runs the listener's coroutines inside `poll()`, on the caller's thread here;
- an eager rebalance that gives a member back a partition it held keeps that partition's
  position and paused flag (kafka-python's `assign_from_subscribed`; Java's consumer clears
  them), while a partition new to the member starts at the group's committed offset;
- losing the partitions (an eviction) drops their state.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from streams.worker.dead_letters import H_SOURCE_OFFSET, H_SOURCE_PARTITION


@dataclass
class FakeBroker:
    """Input logs, the group's committed offsets, and which input records have an output (score
    or dead letter) that the broker acknowledged."""

    topic: str = "images"
    partitions: int = 2
    logs: dict[TopicPartition, list[bytes]] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    covered: set[tuple[int, int]] = field(default_factory=set)  # (partition, offset)
    outputs: list[tuple[str, bytes | None, list]] = field(default_factory=list)
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for p in range(self.partitions):
            self.logs.setdefault(TopicPartition(self.topic, p), [])

    def produce(self, partition: int, values: Iterable[bytes]) -> None:
        self.logs[TopicPartition(self.topic, partition)].extend(values)

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        plain = {tp: getattr(o, "offset", o) for tp, o in offsets.items()}
        self.commits.append(plain)
        self.committed.update(plain)
        self.check_commits()

    def check_commits(self) -> None:
        """The at-least-once rule: no committed offset passes a record without an output."""
        for tp, end in self.committed.items():
            missing = [o for o in range(end) if (tp.partition, o) not in self.covered]
            assert not missing, f"{tp} committed at {end} past unscored offsets {missing[:10]}"

    def accept(self, topic: str, value: bytes | None, headers: list | None) -> None:
        self.outputs.append((topic, value, headers or []))
        names = dict(headers or [])
        if H_SOURCE_OFFSET in names:  # a dead letter
            partition = int(names[H_SOURCE_PARTITION])
            self.covered.add((partition, int(names[H_SOURCE_OFFSET])))
        elif value:
            for line in value.splitlines():
                obj = json.loads(line)
                if "offset" in obj:  # a score or an alert
                    self.covered.add((obj["partition"], obj["offset"]))

    def end(self, tp: TopicPartition) -> int:
        return len(self.logs[tp])


class _Coordinator:
    """What the worker reads of kafka-python's group coordinator."""

    def __init__(self, consumer: FakeConsumer) -> None:
        self._consumer = consumer

    def stable(self) -> bool:
        return True

    def coordinator_unknown(self) -> bool:
        return False

    async def _commit_offsets_sync_async(self, offsets: dict, timeout_ms: int) -> None:
        self._consumer.broker.commit(offsets)


class FakeConsumer:
    """One group member. Rebalances are queued with `rebalance()` or `lose()` and happen inside
    the next `poll()`, as kafka-python runs them."""

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self._coordinator = _Coordinator(self)
        self._listener: Any = None
        self.position: dict[TopicPartition, int] = {}  # the assigned partitions
        self.paused: set[TopicPartition] = set()
        self._events: list[tuple[str, set[TopicPartition]]] = []
        self.polls = 0

    # -- what the test does ------------------------------------------------------------------

    def rebalance(self, assigned: Iterable[TopicPartition]) -> None:
        """An eager rebalance: revoke everything, then assign `assigned`."""
        self._events.append(("eager", set(assigned)))

    def lose(self, assigned: Iterable[TopicPartition]) -> None:
        """Evicted: the partitions are lost, then `assigned` on rejoining."""
        self._events.append(("lost", set(assigned)))

    # -- kafka-python's API, the part the worker uses ----------------------------------------

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.broker.partitions)) if topic == self.broker.topic else set()

    def subscribe(self, topics: list[str], *, listener: Any) -> None:
        self._listener = listener
        self.rebalance(TopicPartition(topics[0], p) for p in self.partitions_for_topic(topics[0]))

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        self.polls += 1
        while self._events:
            self._run_rebalance(*self._events.pop(0))
        out: dict[TopicPartition, list[ConsumerRecord]] = {}
        budget = max_records or 500
        for tp, position in self.position.items():
            if tp in self.paused or budget <= 0:
                continue
            values = self.broker.logs[tp][position : position + budget]
            if values:
                out[tp] = [_record(tp, position + i, v) for i, v in enumerate(values)]
                self.position[tp] = position + len(values)
                budget -= len(values)
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        if tp not in self.position:
            raise ValueError("Unassigned partition")
        self.position[tp] = offset

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tp for tp in tps if tp in self.position)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)

    def highwater(self, tp: TopicPartition) -> int:
        return self.broker.end(tp)

    def commit(self, *, offsets: dict, timeout_ms: int | None = None) -> None:
        self.broker.commit(offsets)

    def commit_async(self, *, offsets: dict, callback: Any) -> None:
        self.broker.commit(offsets)
        callback(offsets, None)

    def _run_rebalance(self, kind: str, assigned: set[TopicPartition]) -> None:
        old = set(self.position)
        if kind == "lost":
            asyncio.run(self._listener.on_partitions_lost(old))
            self.position.clear()
            self.paused.clear()
        else:
            asyncio.run(self._listener.on_partitions_revoked(old))
        for tp in set(self.position) - assigned:  # kept ones keep position and pause
            del self.position[tp]
            self.paused.discard(tp)
        for tp in assigned - set(self.position):
            self.position[tp] = self.broker.committed.get(tp, 0)
        asyncio.run(self._listener.on_partitions_assigned(assigned))


def _record(tp: TopicPartition, offset: int, value: bytes) -> ConsumerRecord:
    return ConsumerRecord(
        tp.topic, tp.partition, -1, offset, 1_700_000_000_000, 0, None, value, [], None,
        -1, len(value), -1,
    )  # fmt: skip


class _Future:
    def __init__(self, producer: FakeProducer, message: tuple) -> None:
        self._producer = producer
        self.message = message
        self.is_done = False
        self.exception: BaseException | None = None

    def failed(self) -> bool:
        return self.exception is not None

    def complete(self) -> None:
        if not self.is_done:
            self.is_done = True
            self._producer.broker.accept(*self.message)


class FakeProducer:
    """Sends are acknowledged when the test says (`ack`), in any order, or by `flush()`."""

    def __init__(self, broker: FakeBroker, *, seed: int = 0) -> None:
        self.broker = broker
        self.pending: list[_Future] = []
        self._random = random.Random(seed)

    def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def send(
        self, topic, value=None, key=None, headers=None, partition=None, timestamp_ms=None
    ) -> _Future:
        future = _Future(self, (topic, value, list(headers or [])))
        self.pending.append(future)
        return future

    def ack(self, fraction: float = 1.0) -> None:
        """Acknowledge a random share of the outstanding sends."""
        self._random.shuffle(self.pending)
        cut = round(len(self.pending) * fraction)
        for future in self.pending[:cut]:
            future.complete()
        self.pending = self.pending[cut:]

    def flush(self, timeout: float | None = None) -> None:
        self.ack(1.0)
