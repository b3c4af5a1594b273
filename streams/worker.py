"""The worker loop: poll, decode, score, publish, commit, with at-least-once delivery.

A record's way from poll to commit: `_fill_buffer` polls it into the buffer; `_start_batch` cuts
a batch, decodes it, opens it in the ledger and hands it to the scorer; `_publish_oldest` waits
for its scores and publishes its outputs; the outbox (streams.delivery) reports the batch once
the broker has acknowledged every output, and the ledger (streams.ledger) then lets its offsets
be committed, in order. Full batches are scored (in a child process on the CPU, on the CUDA
stream on a GPU) while the next is being collected.

Backpressure: while the ledger counts more unacknowledged records or bytes than allowed, or a
send waits for its retry, the worker pauses its partitions and only services acks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import numpy as np
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from detector import Scores
from streams.codec import DECODE_ERROR, SCORING_ERROR, DecodedBatch, decode_batch
from streams.config import StreamConfig
from streams.delivery import Outbox, UnsendableError, unacked_bytes
from streams.ledger import OffsetLedger
from streams.lifecycle import ModelLifecycle
from streams.metrics import WorkerMetrics
from streams.publish import ResultPublisher
from streams.scoring import PendingBatch, Scorer
from streams.worker_state import WorkerState

__all__ = ["Worker", "WorkerState"]

logger = logging.getLogger(__name__)

_SERVICE_POLL_MS = 2  # poll timeout while a batch is being scored
_ACK_POLL_MS = 10  # poll timeout while sends await their acks, or while paused
_IDLE_POLL_MS = 100
_LAG_INTERVAL_S = 0.5
# With inline scoring, poll() takes up to this many batches at once: kafka-python sends the next
# fetch only once its buffered fetch data has been handed over entirely, so taking all of it
# keeps a fetch in flight while the worker decodes and scores. An overlapping scorer gets one
# batch per poll instead, so that it is handed its next batch before it runs dry.
_POLL_BATCHES = 8
_SCORING_DEPTH = 2  # batches handed to an overlapping scorer: one being scored, one queued
_TP_KEY = attrgetter("topic", "partition")


@dataclass
class _Batch:
    batch_id: int
    records: list[Any]
    decoded: DecodedBatch
    scoring: PendingBatch | None
    cut_at: float  # time.time() when it was cut from the buffer
    polled_at: float  # time.time() when poll() returned the oldest records of the buffer


def _offset_ranges(records: list[Any]) -> dict[TopicPartition, tuple[int, int]]:
    """(first offset, last offset + 1) per partition; offsets rise within a partition, and the
    reversed pass leaves each partition's first record."""
    keys = list(map(_TP_KEY, records))
    last = {key: r.offset + 1 for key, r in zip(keys, records, strict=True)}
    first = {key: r.offset for key, r in zip(reversed(keys), reversed(records), strict=True)}
    return {TopicPartition(*key): (first[key], end) for key, end in last.items()}


class _Rebalance(AsyncConsumerRebalanceListener):
    """kafka-python 3 calls the listener on its I/O thread, where blocking consumer calls are
    refused; the async variant may await the coordinator instead."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._worker.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._worker.on_assigned(set(assigned))


class Worker:
    def __init__(
        self,
        *,
        config: StreamConfig,
        scorer: Scorer,
        publisher: ResultPublisher,
        metrics: WorkerMetrics,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        state: WorkerState,
        lifecycle: ModelLifecycle | None = None,
    ) -> None:
        self._config = config
        self._lifecycle = lifecycle  # hot reload, shadow, drift (streams/lifecycle.py)
        self._consumer = consumer
        self._producer = producer
        self._metrics = metrics
        self._state = state
        self._ledger = OffsetLedger()
        self._outbox = Outbox(publisher=publisher, config=config, on_error=self._error)
        self._buffer: list[Any] = []
        self._scoring: deque[_Batch] = deque()
        self._paused = False
        self._polled_at = 0.0
        self._swap: tuple[Scorer, ResultPublisher] | None = (scorer, publisher)
        self._swap_model()
        self._sent_at: dict[int, float] = {}  # batch id -> when its outputs were sent
        self._lag_at = self._commit_at = 0.0
        self.on_batch_scored: Callable[[int], None] | None = None  # for benchmarks
        state.liveness_timeout_s = config.liveness_timeout_s

    # -- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> bool:
        """Consume until `stop` is set, then drain. True when everything was committed."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is not None and hasattr(coordinator, "stable"):
            self._state.group_stable = coordinator.stable
        self._consumer.subscribe([self._config.input_topic], listener=_Rebalance(self))
        try:
            while not stop.is_set():
                self._fill_buffer(stop)
                if self._swap is not None:
                    self._swap_model()
                self._publish_scored()
                if self._buffer and not self._held_back():
                    if len(self._scoring) >= self._depth:  # the scorer has enough: wait
                        self._publish_oldest()
                    full = self._start_batch() == self._config.max_batch_size
                    if not full or not self._scorer.overlaps:
                        # Inline scoring is done already; a batch cut by its deadline means the
                        # worker has caught up, and publishing it now spares its alerts a poll.
                        self._publish_all()
            return self._drain()
        except UnsendableError as exc:
            logger.error("%s", exc)
            self._commit(sync=True)  # what precedes the unsendable record only
            return False

    def swap_model(self, scorer: Scorer, publisher: ResultPublisher) -> None:
        """Score later batches with another model (any thread may call this). The loop applies
        it between batches, once every batch the old scorer holds has been published with the
        old publisher (so an output's model_version always names the model that scored it)."""
        self._swap = (scorer, publisher)

    def _swap_model(self) -> None:
        """Take the scorer and publisher of `swap_model` (or of the constructor)."""
        self._publish_all()
        assert self._swap is not None
        (self._scorer, self._publisher), self._swap = self._swap, None
        overlap = self._scorer.overlaps
        self._depth = _SCORING_DEPTH if overlap else 1
        self._poll_records = self._config.max_batch_size * (1 if overlap else _POLL_BATCHES)

    @property
    def scorer(self) -> Scorer:
        """The scorer of the model that serves now (it changes at a hot swap)."""
        return self._scorer

    def _swap_if_ready(self) -> None:
        """A new model the lifecycle has loaded, verified and warmed up takes over, between two
        batches (also while idle, so the gauges follow at once)."""
        candidate = self._lifecycle.take_swap() if self._lifecycle is not None else None
        if candidate is None:
            return
        old = self._scorer
        self.swap_model(candidate.prepared, self._lifecycle.publisher_for(candidate.detector))
        self._swap_model()
        self._lifecycle.swapped(candidate, old_scorer=old)

    def _observe(self, records: list[Any], decoded: DecodedBatch, scores: Scores) -> None:
        """The lifecycle's turn after a batch is published: counts, drift, the shadow."""
        keys = None
        if self._lifecycle.needs_keys:
            valid = decoded.valid.tolist()
            pairs = zip(records, valid, strict=True)
            keys = [(r.topic, r.partition, r.offset) for r, ok in pairs if ok]
        self._lifecycle.observe(decoded.images, scores, keys)

    def _poll(self, timeout_ms: int, max_records: int) -> dict:
        try:
            polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as exc:
            self._error("broker", exc)
            self._state.broker_connected = False
            time.sleep(0.1)
            return {}
        coordinator = getattr(self._consumer, "_coordinator", None)
        unknown = getattr(coordinator, "coordinator_unknown", None)
        self._state.broker_connected = not unknown() if unknown is not None else True
        return polled

    def _fill_buffer(self, stop: threading.Event) -> None:
        """Poll until the buffer holds max_batch_size records or its first record has waited
        max_batch_delay_ms; meanwhile publish scored batches and service acks and commits."""
        size = self._config.max_batch_size
        delay_s = self._config.max_batch_delay_ms / 1000.0
        first_at = time.monotonic() if self._buffer else None
        while not stop.is_set():
            held = self._service()
            self._swap_if_ready()
            if len(self._buffer) >= size and not held:
                return
            # Short polls only while a batch is being scored (to publish it as soon as it is
            # done) or while sends await acks; every poll costs a round trip to kafka-python.
            if self._scoring:
                timeout_ms = _SERVICE_POLL_MS
            elif held or (len(self._outbox) and not self._buffer):
                timeout_ms = _ACK_POLL_MS
            else:
                timeout_ms = _IDLE_POLL_MS
            if first_at is not None and not held:
                left_ms = (first_at + delay_s - time.monotonic()) * 1000.0
                if left_ms <= 0:
                    return
                timeout_ms = max(0, min(timeout_ms, int(left_ms)))
            polled = self._poll(timeout_ms, self._poll_records)
            if polled and not self._buffer:
                self._polled_at = time.time()
            for tp, records in polled.items():
                self._ledger.consumed_from(tp, records[0].offset)
                self._buffer.extend(records)
            if self._buffer and first_at is None:
                first_at = time.monotonic()
            self._publish_scored()
            if first_at is not None and delay_s == 0 and not held:
                return

    def _start_batch(self) -> int:
        """Cut the next batch from the buffer, decode it, open it in the ledger and hand it
        to the scorer; returns its size."""
        size = self._config.max_batch_size
        records, self._buffer = self._buffer[:size], self._buffer[size:]
        try:
            decoded = decode_batch(
                [r.value for r in records], codec=self._config.codec, keys=[r.key for r in records]
            )
        except Exception as exc:  # a decoder bug must not lose records: dead-letter them all
            self._error("decode", exc)
            decoded = _all_invalid(len(records), DECODE_ERROR, exc)
        self._metrics.batch_size.observe(len(records))
        nbytes = sum(len(r.value or b"") for r in records)
        batch_id = self._ledger.open(_offset_ranges(records), records=len(records), nbytes=nbytes)
        caught_up = len(records) < size
        scoring = (
            self._scorer.submit(decoded.images, caught_up=caught_up) if decoded.n_valid else None
        )
        self._scoring.append(
            _Batch(batch_id, records, decoded, scoring, time.time(), self._polled_at)
        )
        return len(records)

    def _publish_scored(self) -> None:
        """Publish the batches whose scores are in, oldest first."""
        while self._scoring and (
            self._scoring[0].scoring is None or self._scoring[0].scoring.done()
        ):
            self._publish_oldest()

    def _publish_all(self) -> None:
        while self._scoring:
            self._publish_oldest()

    def _publish_oldest(self) -> None:
        batch = self._scoring.popleft()
        scores: Scores | None = None
        decoded = batch.decoded
        if batch.scoring is not None:
            try:
                scores = batch.scoring.result()
                self._metrics.inference_seconds.observe(batch.scoring.seconds)
            except Exception as exc:  # dead-letter the batch rather than retry forever
                self._error("scoring", exc)
                logger.exception("scoring failed; %d records go to the DLQ", decoded.n_valid)
                decoded = _all_invalid(len(batch.records), SCORING_ERROR, exc, decoded.errors)
        scored_at = time.time()
        published = self._publisher.publish(batch.records, decoded, scores)
        sent_at = time.time()
        if self._lifecycle is not None and scores is not None:
            self._observe(batch.records, decoded, scores)
        if self._ledger.tracks(batch.batch_id):  # not revoked while it was being scored
            self._outbox.add(batch.batch_id, published)
            self._ledger.unacked_bytes += unacked_bytes(published)
            self._sent_at[batch.batch_id] = sent_at
        stage = self._metrics.stage_seconds
        if len(published.timestamps_ms):  # the oldest record: produced -> returned by poll()
            stage.labels(stage="fetch").observe(
                batch.polled_at - published.timestamps_ms.min() / 1e3
            )
        stage.labels(stage="batching").observe(batch.cut_at - batch.polled_at)
        stage.labels(stage="score").observe(scored_at - batch.cut_at)
        stage.labels(stage="publish").observe(sent_at - scored_at)
        self._state.progressed(has_work=True)
        if self.on_batch_scored is not None:
            self.on_batch_scored(len(batch.records))

    # -- acknowledgements, backpressure and commits ----------------------------------------

    def _take_acks(self) -> None:
        acked = self._outbox.reap()
        for batch_id, published in acked:
            self._ledger.unacked_bytes -= unacked_bytes(published)
            self._ledger.acknowledge(batch_id)
            sent_at = self._sent_at.pop(batch_id, None)
            if sent_at is not None:
                self._metrics.stage_seconds.labels(stage="ack").observe(time.time() - sent_at)
            published.count(self._metrics)
        busy = bool(self._buffer or self._scoring or self._ledger.has_work())
        if acked or not busy:
            self._state.progressed(has_work=busy)
        else:
            self._state.has_work = True

    def _service(self) -> bool:
        """Take acknowledged batches, commit on the timer, pause or resume consuming; returns
        whether consuming is held back."""
        self._take_acks()
        now = time.monotonic()
        if now - self._commit_at >= self._config.commit_interval_ms / 1000.0:
            self._commit_at = now
            self._commit(sync=False)
        if now - self._lag_at >= _LAG_INTERVAL_S:
            self._lag_at = now
            self._update_lag()
        held = self._held_back()
        if held != self._paused and self._state.assigned:
            (self._consumer.pause if held else self._consumer.resume)(*self._state.assigned)
            self._paused = held
            logger.info("consuming %s", "paused (backpressure)" if held else "resumed")
        return held

    def _held_back(self) -> bool:
        ledger, config = self._ledger, self._config
        return (
            ledger.unacked_records >= config.max_unacked_records
            or ledger.unacked_bytes >= config.max_unacked_bytes
            or self._outbox.retrying
        )

    def _commit(self, *, sync: bool) -> bool:
        offsets = {
            tp: OffsetAndMetadata(offset, "", -1)
            for tp, offset in self._ledger.committable(self._state.assigned).items()
        }
        if not offsets:
            return True
        try:
            if sync:  # bounded: an unresponsive broker must not hold a shutdown forever
                timeout_ms = int(self._config.drain_timeout_s * 1000)
                self._consumer.commit(offsets=offsets, timeout_ms=timeout_ms)
            else:
                self._consumer.commit_async(offsets=offsets, callback=self._on_commit)
        except KafkaError as exc:
            self._error("commit", exc)  # committed with a later batch, or re-delivered
            return False
        self._ledger.mark_committed({tp: meta.offset for tp, meta in offsets.items()})
        return True

    def _on_commit(self, offsets: Any, response: Any) -> None:
        if isinstance(response, Exception):
            self._error("commit", response)

    def _await_acks(self, timeout_s: float) -> None:
        """Flush and take acks (with retries) until every sent batch is settled or time is up."""
        deadline = time.monotonic() + timeout_s
        while len(self._outbox) and time.monotonic() < deadline:
            try:
                self._producer.flush(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
            except KafkaError as exc:
                self._error("produce", exc)
            self._take_acks()
            if len(self._outbox):
                time.sleep(0.01)

    def _update_lag(self) -> None:
        for tp in self._state.assigned:
            end = self._consumer.highwater(tp)
            done = self._ledger.position(tp)
            if end is not None and done is not None:
                labels = {"topic": tp.topic, "partition": str(tp.partition)}
                self._metrics.consumer_lag.labels(**labels).set(max(0, end - done))

    # -- rebalances and shutdown -----------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before partitions move: publish what is being scored, wait for acks, commit what
        the ledger allows, forget the rest (the next owner consumes it again)."""
        try:
            self._publish_all()
            self._await_acks(self._config.drain_timeout_s)
        except UnsendableError:
            logger.error("rebalance: an unsendable record; its batch is left uncommitted")
        offsets = {
            tp: OffsetAndMetadata(offset, "", -1)
            for tp, offset in self._ledger.committable(revoked).items()
        }
        if offsets:
            # The awaitable commit of kafka-python 3's coordinator (no public one exists yet);
            # the blocking consumer.commit() is refused on the I/O thread.
            coordinator = self._consumer._coordinator
            try:
                await coordinator._commit_offsets_sync_async(offsets)
                self._ledger.mark_committed({tp: m.offset for tp, m in offsets.items()})
            except KafkaError as exc:
                self._error("commit", exc)
        self._ledger.revoke(revoked)
        self._outbox.keep_only(self._ledger.tracks)
        self._buffer = [r for r in self._buffer if TopicPartition(*_TP_KEY(r)) not in revoked]
        for tp in revoked:
            with contextlib.suppress(KeyError):
                self._metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        self._state.assigned = self._state.assigned - revoked
        self._state.group_joined = bool(self._state.assigned)
        self._paused = False
        if revoked:
            logger.info("partitions revoked: %s", sorted(str(tp) for tp in revoked))

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._state.assigned = set(assigned)
        self._state.group_joined = True
        logger.info("partitions assigned: %s", sorted(str(tp) for tp in assigned))

    def _drain(self) -> bool:
        """Score and publish what is in hand, wait for the acks, commit, leave the group.
        True only when every record consumed was acknowledged and committed."""
        self._publish_all()
        while self._buffer:
            self._start_batch()
            self._publish_all()
        self._await_acks(self._config.drain_timeout_s)
        committed = self._commit(sync=True)
        complete = committed and not self._ledger.has_work()
        if not complete:
            logger.error("shutdown: some outputs were not acknowledged; not committed")
        return complete

    def _error(self, kind: str, exc: BaseException) -> None:
        self._metrics.errors.labels(kind=kind).inc()
        logger.warning("%s error: %s", kind, exc)


def _all_invalid(
    n: int, reason: str, exc: BaseException, errors: dict | None = None
) -> DecodedBatch:
    """Every record of a batch dead-lettered with `reason` (those already invalid keep theirs)."""
    detail = f"{type(exc).__name__}: {exc}"[:200]
    return DecodedBatch(
        images=np.empty((0, 784), np.uint8),
        valid=np.zeros(n, dtype=bool),
        errors={i: (reason, detail) for i in range(n)} | dict(errors or {}),
    )
