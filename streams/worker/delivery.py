"""The one owner of the worker's batches, from the moment they are cut until their offsets are
committed: it publishes them once scored, sends, retries and dead-letters their outputs
(streams/worker/batch.py), acknowledges them in the offset ledger and commits what the ledger
allows. Commits go out on a timer, on a revoke and at shutdown, all taken from that one ledger,
so no path can commit past a batch whose outputs are outstanding. While the ledger counts more
unacknowledged records or bytes than allowed, or a send waits for its retry, consuming is held
back: the partitions are paused until the acks catch up.

Outputs the broker refuses are replaced (streams/worker/batch.py, output_refusals.py); under
exactly_once the transaction they doomed is aborted once, the refusals remembered for its redo.

A revoke is handled here too (kafka-python calls the listener on its I/O thread while the
worker's thread waits in poll()): publish what is being scored, wait for the acks, commit the
acknowledged prefix, forget the rest. The worker learns which partitions were forgotten from
`take_forgotten()` when poll() returns, and drops their buffered records itself.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from operator import attrgetter
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from detector import Scores
from streams.client_internals import commit_in_listener, fatal_error
from streams.codec import SCORING_ERROR, DecodedBatch
from streams.config import StreamConfig
from streams.worker.batch import (
    InFlightBatch,
    TransactionFailedError,
    UnsendableError,
    all_invalid,
)
from streams.worker.ledger import OffsetLedger
from streams.worker.metrics import WorkerMetrics
from streams.worker.output_refusals import OutputRefusals
from streams.worker.publish import ResultPublisher
from streams.worker.scoring import PendingBatch
from streams.worker.state import WorkerState
from streams.worker.transactions import ProducerFailedError, Transactions

logger = logging.getLogger(__name__)

_LAG_INTERVAL_S = 0.5
# How long a doomed transaction waits for the answers to its other sends, for their refusals.
# A producer can hold sends back far longer (kafka-python's epoch bump): the loop must go on.
_REFUSAL_ANSWERS_S = 5.0
_TP_KEY = attrgetter("topic", "partition")

Published = Callable[[InFlightBatch, DecodedBatch, Scores | None], None]


def offset_ranges(records: list[Any]) -> dict[TopicPartition, tuple[int, int]]:
    """(first offset, last offset + 1) per partition; offsets rise within a partition, and the
    reversed pass leaves each partition's first record."""
    keys = list(map(_TP_KEY, records))
    last = {key: r.offset + 1 for key, r in zip(keys, records, strict=True)}
    first = {key: r.offset for key, r in zip(reversed(keys), reversed(records), strict=True)}
    return {TopicPartition(*key): (first[key], end) for key, end in last.items()}


class Delivery:
    def __init__(
        self,
        *,
        config: StreamConfig,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        metrics: WorkerMetrics,
        state: WorkerState,
        on_error: Callable[[str, BaseException], None],
        on_published: Published | None = None,
        transactions: Transactions | None = None,
    ) -> None:
        self._config = config
        self._consumer = consumer
        self._producer = producer
        self._metrics = metrics
        self._state = state
        self._on_error = on_error
        self._on_published = on_published
        self._transactions = transactions  # exactly_once; None: at_least_once
        self.ledger = OffsetLedger()
        self.output_refusals = OutputRefusals(on_refused=metrics.count_refused)
        self._scoring: deque[InFlightBatch] = deque()  # cut, being scored, oldest first
        self._sending: dict[int, InFlightBatch] = {}  # sent, awaiting acknowledgements
        self._forgotten: set[TopicPartition] = set()
        self._started_at: dict[TopicPartition, int] = {}  # first offset consumed, per partition
        # Set: the worker stops without committing what it holds (an unsendable record under
        # on_unsendable=fail, a transaction that could not even be aborted).
        self.failure: Exception | None = None
        self.shutdown_deadline: float | None = None  # time.monotonic() the shutdown ends by
        self._commit_at = self._lag_at = 0.0
        self._paused = False

    # -- from cut to sent ------------------------------------------------------------------

    def consumed(self, polled: dict[TopicPartition, list[Any]]) -> None:
        for tp, records in polled.items():
            self.ledger.consumed_from(tp, records[0].offset)
            self._started_at.setdefault(tp, records[0].offset)

    def open(
        self,
        records: list[Any],
        decoded: DecodedBatch,
        scoring: PendingBatch | None,
        *,
        publisher: ResultPublisher,
        polled_at: float,
        cut_at: float,
    ) -> InFlightBatch:
        """A batch cut from polled records, handed to the scorer (`scoring`) or not; the
        time.time() stamps of the poll that returned its oldest records and of its cut."""
        nbytes = sum(len(r.value or b"") for r in records)
        batch_id = self.ledger.open(offset_ranges(records), records=len(records), nbytes=nbytes)
        batch = InFlightBatch(
            batch_id, records, decoded, scoring, publisher, polled_at, cut_at, self.output_refusals
        )
        self._scoring.append(batch)
        return batch

    @property
    def in_scoring(self) -> int:
        return len(self._scoring)

    def publish_ready(self) -> None:
        """Publish the batches whose scores are in, oldest first."""
        while self._scoring and self._scoring[0].scored:
            self.publish_oldest()

    def publish_all(self) -> None:
        while self._scoring:
            self.publish_oldest()

    def publish_oldest(self) -> None:
        batch = self._scoring.popleft()
        scores: Scores | None = None
        decoded = batch.decoded
        if batch.scoring is not None:
            try:
                scores = batch.scoring.result()
                self._metrics.inference_seconds.observe(batch.scoring.seconds)
            except Exception as exc:  # dead-letter the batch rather than retry forever
                self._on_error("scoring", exc)
                logger.exception("scoring failed; %d records go to the DLQ", decoded.n_valid)
                decoded = all_invalid(len(batch.records), SCORING_ERROR, exc, decoded.errors)
        if not self.ledger.tracks(batch.batch_id):
            return  # its partitions were revoked while it was scored: the next owner's now
        scored_at = time.time()
        outputs = batch.publisher.build(
            batch.records, decoded, scores, frame_bytes=self.output_refusals.frame_bytes
        )
        if self._transactions is not None:
            self._transactions.begin()
        batch.send(outputs)
        self.ledger.add_bytes(batch.batch_id, sum(len(m.value or b"") for m in outputs.messages))
        self._sending[batch.batch_id] = batch
        timestamps = outputs.timestamps_ms
        self._metrics.observe_stages(
            produced=timestamps.min() / 1e3 if len(timestamps) else None,
            polled=batch.polled_at,
            cut=batch.cut_at,
            scored=scored_at,
            sent=batch.sent_at,
        )
        if self._on_published is not None:
            self._on_published(batch, decoded, scores)

    # -- from sent to committed ------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return self.ledger.has_work()

    @property
    def sending(self) -> bool:
        return bool(self._sending)

    def take_acks(self) -> int:
        """Settle the batches whose outputs are all acknowledged now; returns how many. A send
        that can never be made under on_unsendable: fail sets `failure`; a send that fails a
        transaction aborts it."""
        acked = 0
        transactional = self._transactions is not None
        for batch in list(self._sending.values()):
            try:
                if not batch.settle(self._config, self._on_error, transactional=transactional):
                    continue
            except UnsendableError as exc:
                self.failure = exc
                continue
            except TransactionFailedError as exc:
                self._abort_refused(f"a send failed ({exc})", cause=exc.__cause__)
                return acked
            del self._sending[batch.batch_id]
            self.ledger.acknowledge(batch.batch_id)
            self._metrics.stage_seconds.labels(stage="ack").observe(time.time() - batch.sent_at)
            assert batch.outputs is not None
            batch.outputs.count(self._metrics)
            acked += 1
        return acked

    def held_back(self) -> bool:
        ledger, config = self.ledger, self._config
        return (
            ledger.unacked_records >= config.max_unacked_records
            or ledger.unacked_bytes >= config.max_unacked_bytes
            or any(batch.retrying for batch in self._sending.values())
        )

    def tick(self) -> bool:
        """Commit on the timer, report lag, pause or resume consuming; returns whether
        consuming is held back."""
        now = time.monotonic()
        if self._transactions is not None:
            if self._transactions.due():
                self.commit(timeout_s=self._config.request_timeout_ms / 1000.0)
        elif now - self._commit_at >= self._config.commit_interval_ms / 1000.0:
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
        broker refused it or did not answer in time. Under exactly_once: commit the open
        transaction (bounded by `timeout_s`, or request_timeout_ms)."""
        if self._transactions is not None:
            timeout_s = self._config.request_timeout_ms / 1000.0 if timeout_s is None else timeout_s
            return self._commit_transaction(self._state.assigned, timeout_s=timeout_s)
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
        plain = {tp: meta.offset for tp, meta in offsets.items()}
        self.ledger.mark_committed(plain)
        self.output_refusals.committed(plain)

    def await_acks(self, deadline: float) -> None:
        """Flush and take acks (with retries) until every sent batch is settled, the
        time.monotonic() `deadline` has passed or a record turned out unsendable."""
        while self._sending and time.monotonic() < deadline and self.failure is None:
            try:
                self._producer.flush(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
            except KafkaError as exc:
                self._on_error("produce", exc)
            self.take_acks()
            if self._sending:
                time.sleep(0.01)

    # -- shutdown and rebalances -----------------------------------------------------------

    def start_shutdown(self) -> None:
        if self.shutdown_deadline is None:
            self.shutdown_deadline = time.monotonic() + self._config.drain_timeout_s

    def time_left(self) -> float:
        """Seconds a blocking step may take: what is left of the shutdown, or (in a rebalance
        while running) drain_timeout_s."""
        if self.shutdown_deadline is None:
            return self._config.drain_timeout_s
        return max(0.0, self.shutdown_deadline - time.monotonic())

    async def revoke(self, revoked: set[TopicPartition]) -> None:
        """Partitions move to another worker (or this one leaves the group): publish what is
        being scored, wait for the acks, commit the acknowledged prefix, forget the rest; the
        next owner consumes it again."""
        self.publish_all()
        self.output_refusals.forget(revoked)
        if self._transactions is not None:
            self._commit_transaction(self._state.assigned | revoked, timeout_s=self.time_left())
            self.forget(revoked)
            return
        self.await_acks(time.monotonic() + self.time_left())
        if self.failure is not None:
            logger.error("rebalance: an unsendable record; its batch is left uncommitted")
        offsets = self._committable(revoked)
        if offsets:
            try:
                timeout_ms = max(1, int(self.time_left() * 1000))
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
            position = self._restart_position(tp)
            if position is not None:
                with contextlib.suppress(ValueError):  # no longer assigned: nothing to reset
                    self._consumer.seek(tp, position)
        if self._paused:  # resume them all; the next tick pauses what is still held back
            self._consumer.resume(*self._state.assigned)
            self._paused = False
        self.ledger.revoke(partitions)
        self._sending = {i: b for i, b in self._sending.items() if self.ledger.tracks(i)}
        self._forgotten |= partitions
        for tp in partitions:
            self._started_at.pop(tp, None)
            with contextlib.suppress(KeyError):
                self._metrics.consumer_lag.remove(tp.topic, str(tp.partition))

    def lose(self, partitions: set[TopicPartition]) -> None:
        """Evicted: the group gave the partitions away already. Under exactly_once the open
        transaction holds their outputs, which the new owner produces again: abort it."""
        if self._transactions is not None:
            self._abort(f"partitions lost: {sorted(map(str, partitions))}")
        self.output_refusals.forget(partitions)
        self.forget(partitions)

    def stop_on_failure(self) -> None:
        """The worker stops on `failure`: commit what precedes it (at_least_once), or abort the
        transaction, which holds part of the failed batch's outputs (exactly_once)."""
        logger.error("%s", self.failure)
        if self._transactions is not None:
            self._abort(self.failure)
        else:
            self.commit(timeout_s=self.time_left())

    def _restart_position(self, tp: TopicPartition) -> int | None:
        """Where a forgotten partition is consumed again from: after its acknowledged prefix
        (at_least_once: what is acknowledged is committed or safe to commit), or after its last
        committed transaction (exactly_once: acknowledged outputs of an open transaction are
        aborted with it)."""
        if self._transactions is None:
            return self.ledger.position(tp)
        committed = self.ledger.committed(tp)
        return committed if committed is not None else self._started_at.get(tp)

    def _commit_transaction(self, keys: set[TopicPartition], *, timeout_s: float) -> bool:
        """Flush the open transaction's sends, then commit them with the offsets they cover;
        anything that fails aborts it (and rewinds). True when it committed or none was open."""
        transactions = self._transactions
        assert transactions is not None
        if not transactions.open:
            return True
        deadline = time.monotonic() + timeout_s
        self.await_acks(deadline)
        if self.failure is not None or self._sending or not transactions.open:
            self._abort("outputs of the transaction were not acknowledged")
            return False
        offsets = self._committable(keys)
        try:
            transactions.commit(offsets, timeout_s=max(0.001, deadline - time.monotonic()))
        except KafkaError as exc:
            self._on_error("commit", exc)
            self._abort(f"{type(exc).__name__}: {exc}", cause=exc)
            return False
        self._committed(offsets)
        return True

    def _abort_refused(self, reason: str, *, cause: BaseException | None) -> None:
        """A send failed inside the transaction: once every send of it has an answer (bounded),
        remember what the broker refused, so that the redo replaces it, then abort."""
        timeout_s = min(self.time_left(), _REFUSAL_ANSWERS_S)
        try:
            if fatal_error(self._producer) is None:  # a fatal one has failed them all already
                self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:  # not every answer in time: those refusals show in the redo
            self._on_error("produce", exc)
        for batch in self._sending.values():
            batch.remember_refusals()
        self._abort(reason, renew=True, cause=cause)

    def _abort(
        self, reason: object, *, renew: bool = False, cause: BaseException | None = None
    ) -> None:
        """Abort the open transaction and consume everything again from the last committed
        offsets: none of what it held was ever visible to read_committed subscribers. A
        producer that cannot abort any more is replaced (Transactions.recover), or the worker
        stops."""
        transactions = self._transactions
        assert transactions is not None
        try:
            try:
                transactions.abort(
                    reason, timeout_s=max(1.0, self.time_left()), renew=renew, cause=cause
                )
            except KafkaError as exc:
                self._on_error("produce", exc)
                transactions.recover(exc)
        except ProducerFailedError as final:  # fenced, not authorized: its one line says why
            self.failure = final
        except (KafkaError, RuntimeError) as final:
            self.failure = RuntimeError(f"the transaction could not be aborted: {final}")
        held = set(self._started_at) | set(self._state.assigned)
        self.forget(held)

    def take_forgotten(self) -> set[TopicPartition]:
        """Partitions forgotten since the last call (their buffered records are stale)."""
        forgotten, self._forgotten = self._forgotten, set()
        return forgotten

    def _update_lag(self) -> None:
        for tp in self._state.assigned:
            end = self._consumer.highwater(tp)
            done = self.ledger.position(tp)
            if end is not None and done is not None:
                labels = {"topic": tp.topic, "partition": str(tp.partition)}
                self._metrics.consumer_lag.labels(**labels).set(max(0, end - done))
