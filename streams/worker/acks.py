"""From a batch's sends to its commit: acknowledgements, commits, backpressure and lag.

The outbox (delivery.py) reports a batch once the broker has acknowledged every output of
it; the offset ledger (ledger.py) then lets its offsets be committed, in order. Commits
go out on a timer, on a revoke and at shutdown, all taken from that one ledger, so no path can
commit past a batch whose outputs are outstanding. While the ledger counts more unacknowledged
records or bytes than allowed, or a send waits for its retry, consuming is held back: the
partitions are paused until the acks catch up.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from operator import attrgetter
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from streams.client_internals import commit_in_listener
from streams.config import StreamConfig
from streams.worker.delivery import Outbox, unacked_bytes
from streams.worker.ledger import OffsetLedger
from streams.worker.metrics import WorkerMetrics
from streams.worker.publish import PublishedBatch, ResultPublisher
from streams.worker.state import WorkerState

logger = logging.getLogger(__name__)

_LAG_INTERVAL_S = 0.5
_TP_KEY = attrgetter("topic", "partition")


def offset_ranges(records: list[Any]) -> dict[TopicPartition, tuple[int, int]]:
    """(first offset, last offset + 1) per partition; offsets rise within a partition, and the
    reversed pass leaves each partition's first record."""
    keys = list(map(_TP_KEY, records))
    last = {key: r.offset + 1 for key, r in zip(keys, records, strict=True)}
    first = {key: r.offset for key, r in zip(reversed(keys), reversed(records), strict=True)}
    return {TopicPartition(*key): (first[key], end) for key, end in last.items()}


class AckTracker:
    """The worker's batches from the moment they are cut until their offsets are committed."""

    def __init__(
        self,
        *,
        config: StreamConfig,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        publisher: ResultPublisher,
        metrics: WorkerMetrics,
        state: WorkerState,
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        self._config = config
        self._consumer = consumer
        self._producer = producer
        self._metrics = metrics
        self._state = state
        self._on_error = on_error
        self.ledger = OffsetLedger()
        self._outbox = Outbox(publisher=publisher, config=config, on_error=on_error)
        self._sent_at: dict[int, float] = {}  # batch id -> when its outputs were sent
        self._commit_at = self._lag_at = 0.0
        self._paused = False

    def open(self, records: list[Any]) -> int:
        """A batch cut from polled records; returns its id."""
        nbytes = sum(len(r.value or b"") for r in records)
        return self.ledger.open(offset_ranges(records), records=len(records), nbytes=nbytes)

    def sent(self, batch_id: int, published: PublishedBatch) -> None:
        """The batch's outputs were handed to the producer: watch them until acknowledged."""
        if self.ledger.tracks(batch_id):  # not revoked while it was being scored
            self._outbox.add(batch_id, published)
            self.ledger.add_bytes(batch_id, unacked_bytes(published))
            self._sent_at[batch_id] = time.time()

    @property
    def has_work(self) -> bool:
        return self.ledger.has_work()

    @property
    def sending(self) -> bool:
        return len(self._outbox) > 0

    def take_acks(self) -> int:
        """Settle the batches whose outputs are all acknowledged now; returns how many."""
        acked = self._outbox.reap()
        for batch_id, published in acked:
            self.ledger.acknowledge(batch_id)
            sent_at = self._sent_at.pop(batch_id, None)
            if sent_at is not None:
                self._metrics.stage_seconds.labels(stage="ack").observe(time.time() - sent_at)
            published.count(self._metrics)
        return len(acked)

    def held_back(self) -> bool:
        ledger, config = self.ledger, self._config
        return (
            ledger.unacked_records >= config.max_unacked_records
            or ledger.unacked_bytes >= config.max_unacked_bytes
            or self._outbox.retrying
        )

    def tick(self) -> bool:
        """Commit on the timer, report lag, pause or resume consuming; returns whether
        consuming is held back."""
        now = time.monotonic()
        if now - self._commit_at >= self._config.commit_interval_ms / 1000.0:
            self._commit_at = now
            self.commit()
        if now - self._lag_at >= _LAG_INTERVAL_S:
            self._lag_at = now
            self._update_lag()
        held = self.held_back()
        if held != self._paused and self._state.assigned:
            (self._consumer.pause if held else self._consumer.resume)(*self._state.assigned)
            self._paused = held
            logger.info("consuming %s", "paused (backpressure)" if held else "resumed")
        return held

    def _committable(self, keys: set[TopicPartition]) -> dict[TopicPartition, OffsetAndMetadata]:
        return {
            tp: OffsetAndMetadata(offset, "", -1)
            for tp, offset in self.ledger.committable(keys).items()
        }

    def commit(self, *, timeout_s: float | None = None) -> bool:
        """Commit what the ledger allows: asynchronously, or (with `timeout_s`) synchronously
        and bounded, so that an unresponsive broker cannot hold a shutdown. False when the
        broker refused it or did not answer in time."""
        offsets = self._committable(self._state.assigned)
        if not offsets:
            return True
        try:
            if timeout_s is None:  # counted as committed once the broker has accepted it
                self._consumer.commit_async(offsets=offsets, callback=self._on_commit)
                return True
            self._consumer.commit(offsets=offsets, timeout_ms=max(1, int(timeout_s * 1000)))
        except KafkaError as exc:
            self._on_error("commit", exc)  # committed with a later batch, or re-delivered
            return False
        self._committed(offsets)
        return True

    def _on_commit(self, offsets: dict[TopicPartition, OffsetAndMetadata], response: Any) -> None:
        """kafka-python calls this from poll(), on the worker's thread."""
        if isinstance(response, Exception):
            self._on_error("commit", response)  # still committable: the next commit retries
        else:
            self._committed(offsets)

    def _committed(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.ledger.mark_committed({tp: meta.offset for tp, meta in offsets.items()})

    def await_acks(self, deadline: float) -> None:
        """Flush and take acks (with retries) until every sent batch is settled or the
        time.monotonic() `deadline` has passed."""
        while self.sending and time.monotonic() < deadline:
            try:
                self._producer.flush(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
            except KafkaError as exc:
                self._on_error("produce", exc)
            self.take_acks()
            if self.sending:
                time.sleep(0.01)

    async def revoke(self, revoked: set[TopicPartition], *, timeout_s: float) -> None:
        """Commit what the ledger allows of partitions that move to another worker, then forget
        them: their open batches are the next owner's to consume again."""
        offsets = self._committable(revoked)
        if offsets:
            try:
                timeout_ms = max(1, int(timeout_s * 1000))
                await commit_in_listener(self._consumer, offsets, timeout_ms=timeout_ms)
                self._committed(offsets)
            except KafkaError as exc:
                self._on_error("commit", exc)
        self.forget(revoked)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drop partitions this worker no longer owns: revoked (after `revoke` committed what
        it could) or lost in an eviction, where the group has given them away already and a
        commit would be refused. Their records not committed are consumed again."""
        # kafka-python 3.0 keeps a partition's position and paused flag when an eager rebalance
        # gives it back to the same member (Java's consumer starts it again from the committed
        # offset). The records past the acknowledged prefix are dropped here, so the consumer
        # goes back to that prefix: were it to go on from its position, the next commit of
        # the partition would pass them unscored (issue 17).
        for tp in partitions:
            position = self.ledger.position(tp)
            if position is not None:
                with contextlib.suppress(ValueError):  # no longer assigned: nothing to reset
                    self._consumer.seek(tp, position)
        if self._paused:  # resume them all; the next tick pauses what is still held back
            self._consumer.resume(*self._state.assigned)
            self._paused = False
        self.ledger.revoke(partitions)
        self._outbox.keep_only(self.ledger.tracks)
        for tp in partitions:
            with contextlib.suppress(KeyError):
                self._metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    def _update_lag(self) -> None:
        for tp in self._state.assigned:
            end = self._consumer.highwater(tp)
            done = self.ledger.position(tp)
            if end is not None and done is not None:
                labels = {"topic": tp.topic, "partition": str(tp.partition)}
                self._metrics.consumer_lag.labels(**labels).set(max(0, end - done))
