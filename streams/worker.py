"""The worker loop: poll, decode, score, publish, commit, with at-least-once delivery.

Up to two full batches are being scored (in a child process on the CPU, on the CUDA stream on a
GPU) while the next is being collected. Published batches wait in a queue until the broker has
acknowledged every one of their sends; only then are their offsets committed, in order. A failed
send rewinds the consumer to the oldest unacknowledged offset, so the records are scored again,
never skipped.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import numpy as np
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from detector import Detector, Scores
from streams.codec import DECODE_ERROR, SCORING_ERROR, DecodedBatch, decode_batch
from streams.config import StreamConfig
from streams.metrics import WorkerMetrics, observe_many
from streams.publish import PublishedBatch, ResultPublisher
from streams.scoring import BatchScorer, Scoring

logger = logging.getLogger(__name__)

_SERVICE_POLL_MS = 2  # poll timeout while a batch is being scored or sends are outstanding
_ACK_POLL_MS = 10  # poll timeout while sends await their acks
_IDLE_POLL_MS = 100
_LAG_INTERVAL_S = 0.5
# With inline scoring, poll() takes up to this many batches of records at once. kafka-python
# sends the next fetch only once its buffered fetch data has been handed over entirely, so taking
# all of it keeps a fetch in flight (network and broker time) while the worker decodes and scores
# what it holds. When scoring overlaps (a child process, a GPU), poll takes one batch at a time
# instead, so that the worker hands the scorer its next batch before the scorer runs dry.
_POLL_BATCHES = 8
# Batches handed to an overlapping scorer and not yet published: one being scored, one queued.
_SCORING_DEPTH = 2


@dataclass
class _InFlight:
    records: list[Any]
    decoded: DecodedBatch
    scoring: Scoring | None


@dataclass
class _Sent:
    published: PublishedBatch
    ends: dict[TopicPartition, int]
    starts: dict[TopicPartition, int]
    n_invalid: int
    checked: int = 0


_TP_KEY = attrgetter("topic", "partition")


def _offset_ranges(records: list[Any]) -> tuple[dict, dict]:
    """(first offset, last offset + 1) per partition of a batch. Offsets rise within a
    partition; the dict comprehensions keep the last write, so the reversed pass yields the
    first offset. No TopicPartition per record (a Python object each)."""
    keys = list(map(_TP_KEY, records))
    last = {key: record.offset + 1 for key, record in zip(keys, records, strict=True)}
    first = {
        key: record.offset for key, record in zip(reversed(keys), reversed(records), strict=True)
    }
    ends = {TopicPartition(*key): offset for key, offset in last.items()}
    starts = {TopicPartition(*key): offset for key, offset in first.items()}
    return starts, ends


class _Rebalance(AsyncConsumerRebalanceListener):
    """kafka-python 3 calls the listener on its I/O thread, where blocking consumer calls
    (commit, committed) are refused; the async variant may await the coordinator instead."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        try:
            await self._worker.on_revoked(set(revoked))
        except Exception:
            logger.exception("handling revoked partitions failed")
            raise

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._worker.on_assigned(set(assigned))


@dataclass
class WorkerState:
    """What /readyz reports; written by the worker thread, read by the HTTP thread."""

    model_loaded: Callable[[], bool] = lambda: False
    broker_connected: bool = False
    group_joined: bool = False
    assigned: set[TopicPartition] = field(default_factory=set)

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        checks = {
            "model_loaded": self.model_loaded(),
            "broker_connected": self.broker_connected,
            "group_joined": self.group_joined,
        }
        return all(checks.values()), checks


class Worker:
    def __init__(
        self,
        *,
        config: StreamConfig,
        detector: Detector,
        scorer: BatchScorer,
        metrics: WorkerMetrics,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        state: WorkerState,
    ) -> None:
        self._config = config
        self._consumer = consumer
        self._producer = producer
        self._metrics = metrics
        self._state = state
        self._scorer = scorer
        self._depth = _SCORING_DEPTH if scorer.overlaps else 1
        self._poll_records = config.max_batch_size * (1 if scorer.overlaps else _POLL_BATCHES)
        self._publisher = ResultPublisher(
            producer=producer,
            alert_topic=config.alert_topic,
            scores_topic=config.scores_topic,
            dlq_topic=config.dlq_topic,
            model_version=detector.version,
            threshold=detector.threshold,
            scores_format=config.scores_format,
        )
        self._buffer: list[Any] = []
        self._inflight: deque[_InFlight] = deque()
        self._sent: deque[_Sent] = deque()
        self._committed: dict[TopicPartition, int] = {}
        self._consumed: dict[TopicPartition, int] = {}  # next offset, from records in hand
        self._to_commit: dict[TopicPartition, int] = {}
        self._lag_at = 0.0
        self._commit_at = 0.0
        self._commit_interval_s = config.commit_interval_ms / 1000.0
        self.on_batch_scored: Callable[[int], None] | None = None  # for benchmarks

    # -- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> bool:
        """Consume until `stop` is set, then drain. True when everything was committed."""
        self._consumer.subscribe([self._config.input_topic], listener=_Rebalance(self))
        while not stop.is_set():
            self._fill_buffer(stop)
            self._publish_scored()
            if self._buffer:
                if len(self._inflight) >= self._depth:  # the scorer has enough: wait for it
                    self._publish_oldest()
                full = self._start_batch() == self._config.max_batch_size
                if not full or not self._scorer.overlaps:
                    # Inline scoring is done already. A batch cut by its deadline means the
                    # worker has caught up: overlapping the next poll gains nothing, and
                    # publishing as soon as the scores are in (a few ms) spares the alerts a
                    # poll's wait. Only full batches (a backlog) overlap the next poll.
                    self._publish_all()
        return self._drain()

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
        max_batch_delay_ms; meanwhile publish the batch in flight and commit acknowledged ones."""
        size = self._config.max_batch_size
        if len(self._buffer) >= size:  # a batch is ready from an earlier poll
            self._service()
            return
        delay_s = self._config.max_batch_delay_ms / 1000.0
        first_at = time.monotonic() if self._buffer else None
        while not stop.is_set() and len(self._buffer) < size:
            # Short polls only while a batch is being scored (to publish it as soon as it is
            # done) or while sends await acks with nothing else to do; every poll costs a
            # round trip to kafka-python's I/O thread.
            if self._inflight:
                timeout_ms = _SERVICE_POLL_MS
            elif self._sent and not self._buffer:
                timeout_ms = _ACK_POLL_MS
            else:
                timeout_ms = _IDLE_POLL_MS
            if first_at is not None:
                left_ms = (first_at + delay_s - time.monotonic()) * 1000.0
                if left_ms <= 0:
                    break
                timeout_ms = max(0, min(timeout_ms, int(left_ms)))
            polled = self._poll(timeout_ms, self._poll_records)
            for records in polled.values():
                self._buffer.extend(records)
            if self._buffer and first_at is None:
                first_at = time.monotonic()
            self._publish_scored()
            self._service()
            if first_at is not None and delay_s == 0:
                break

    def _start_batch(self) -> int:
        """Decode the next batch from the buffer and hand it to the scorer; returns its size."""
        size = self._config.max_batch_size
        if len(self._buffer) <= size:
            records, self._buffer = self._buffer, []
        else:
            records, self._buffer = self._buffer[:size], self._buffer[size:]
        values = [r.value for r in records]
        try:
            decoded = decode_batch(values, codec=self._config.codec)
        except Exception as exc:  # a decoder bug must not lose records: dead-letter them all
            self._error("decode", exc)
            decoded = DecodedBatch(
                images=np.empty((0, 784), np.uint8),
                valid=np.zeros(len(records), dtype=bool),
                errors={i: (DECODE_ERROR, str(exc)[:200]) for i in range(len(records))},
            )
        self._metrics.batch_size.observe(len(records))
        scoring = (
            self._scorer.submit(decoded.images, caught_up=len(records) < size)
            if decoded.n_valid
            else None
        )
        self._inflight.append(_InFlight(records=records, decoded=decoded, scoring=scoring))
        return len(records)

    def _publish_scored(self) -> None:
        """Publish the batches whose scores are in, oldest first (offsets commit in order)."""
        while self._inflight and (
            self._inflight[0].scoring is None or self._inflight[0].scoring.done()
        ):
            self._publish_oldest()

    def _publish_all(self) -> None:
        while self._inflight:
            self._publish_oldest()

    def _publish_oldest(self) -> None:
        batch = self._inflight.popleft()
        scores: Scores | None = None
        decoded = batch.decoded
        if batch.scoring is not None:
            try:
                scores = batch.scoring.result()
            except Exception as exc:  # send the records to the DLQ rather than retry forever
                self._error("scoring", exc)
                logger.exception("scoring failed; %d records go to the DLQ", decoded.n_valid)
                errors = dict(decoded.errors)
                for i in np.flatnonzero(decoded.valid).tolist():
                    errors[i] = (SCORING_ERROR, f"{type(exc).__name__}: {exc}"[:200])
                decoded = DecodedBatch(
                    images=decoded.images[:0],
                    valid=np.zeros_like(decoded.valid),
                    errors=errors,
                )
        published = self._publisher.publish(batch.records, decoded, scores)
        starts, ends = _offset_ranges(batch.records)
        self._consumed.update(ends)
        self._sent.append(
            _Sent(published=published, ends=ends, starts=starts, n_invalid=len(decoded.errors))
        )
        if self.on_batch_scored is not None:
            self.on_batch_scored(len(batch.records))

    # -- acknowledgements and commits ------------------------------------------------------

    def _service(self) -> None:
        self._reap_acknowledged()
        now = time.monotonic()
        if self._to_commit and now - self._commit_at >= self._commit_interval_s:
            self._commit_at = now
            self._commit(sync=False)
        if now - self._lag_at >= _LAG_INTERVAL_S:
            self._lag_at = now
            self._update_lag()

    def _reap_acknowledged(self) -> None:
        while self._sent:
            sent = self._sent[0]
            futures = sent.published.futures
            while sent.checked < len(futures) and futures[sent.checked].is_done:
                sent.checked += 1
            if sent.checked < len(futures):
                return
            failed = next((f.exception for f in futures if f.failed()), None)
            if failed is not None:
                self._rewind(failed)
                return
            self._sent.popleft()
            self._count(sent)
            self._to_commit.update(sent.ends)

    def _count(self, sent: _Sent) -> None:
        published, m = sent.published, self._metrics
        m.records.labels(outcome="normal").inc(published.n_normal)
        m.records.labels(outcome="anomaly").inc(published.n_anomaly)
        m.records.labels(outcome="invalid").inc(sent.n_invalid)
        if published.n_alerts:
            m.alerts_published.inc(published.n_alerts)
        for reason in published.dead_letter_reasons:
            m.dead_letters.labels(reason=reason).inc()
        observe_many(m.score, published.scores)
        if len(published.timestamps_ms):
            latency = time.time() - published.timestamps_ms / 1000.0
            observe_many(m.end_to_end_seconds, latency)

    def _pending_offsets(self) -> dict[TopicPartition, OffsetAndMetadata]:
        assigned = self._state.assigned
        offsets = {
            tp: OffsetAndMetadata(offset, "", -1)
            for tp, offset in self._to_commit.items()
            if tp in assigned
        }
        self._to_commit = {}
        return offsets

    def _record_committed(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        for tp, meta in offsets.items():
            self._committed[tp] = meta.offset

    def _commit(self, *, sync: bool) -> bool:
        offsets = self._pending_offsets()
        if not offsets:
            return True
        try:
            if sync:
                self._consumer.commit(offsets=offsets)
            else:
                self._consumer.commit_async(offsets=offsets, callback=self._on_commit)
        except KafkaError as exc:
            self._error("commit", exc)
            # Offsets not committed are committed with the next batch or re-delivered.
            return False
        self._record_committed(offsets)
        return True

    def _on_commit(self, offsets: Any, response: Any) -> None:
        if isinstance(response, Exception):
            self._error("commit", response)

    def _rewind(self, exc: BaseException) -> None:
        """A send failed: re-consume from the oldest unacknowledged record of each partition."""
        self._error("produce", exc)
        starts: dict[TopicPartition, int] = {}
        for sent in self._sent:
            for tp, offset in sent.starts.items():
                starts.setdefault(tp, offset)
        held = [r for batch in self._inflight for r in batch.records] + self._buffer
        for tp, offset in _offset_ranges(held)[0].items():
            starts.setdefault(tp, offset)
        logger.error("a send failed (%s); re-consuming from %s", exc, starts)
        self._sent.clear()
        self._inflight.clear()
        self._buffer = []
        for tp, offset in starts.items():
            if tp in self._state.assigned:
                self._consumer.seek(tp, offset)

    def _flush_and_commit(self, *, timeout_s: float) -> bool:
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            self._error("produce", exc)
        self._reap_acknowledged()
        committed = self._commit(sync=True)
        return committed and not self._sent

    def _update_lag(self) -> None:
        for tp in self._state.assigned:
            end = self._consumer.highwater(tp)
            if end is None:
                continue
            done = self._committed.get(tp, self._consumed.get(tp))
            if done is None:
                continue
            self._metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                max(0, end - done)
            )

    # -- rebalances and shutdown -----------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before partitions move to another worker: publish the batch in flight, wait for the
        acks, commit; records still in the buffer are left to the next owner (not committed)."""
        self._publish_all()
        try:
            self._producer.flush(timeout=self._config.drain_timeout_s)
        except KafkaError as exc:
            self._error("produce", exc)
        self._reap_acknowledged()
        offsets = self._pending_offsets()
        if offsets:
            coordinator = self._consumer._coordinator
            # The awaitable commit of kafka-python 3's coordinator (no public one exists yet);
            # the blocking consumer.commit() is refused on the I/O thread.
            commit = getattr(coordinator, "_commit_offsets_sync_async", None)
            try:
                if commit is not None:
                    await commit(offsets)
                else:
                    coordinator.commit_offsets_async(offsets)
                self._record_committed(offsets)
            except KafkaError as exc:
                self._error("commit", exc)
        if self._sent:
            logger.warning("rebalance: not every send was acknowledged; those are re-delivered")
        self._sent.clear()
        self._buffer = [
            r for r in self._buffer if TopicPartition(r.topic, r.partition) not in revoked
        ]
        for tp in revoked:
            self._committed.pop(tp, None)
            self._consumed.pop(tp, None)
            with contextlib.suppress(KeyError):
                self._metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        self._state.assigned = self._state.assigned - revoked
        if revoked:
            logger.info("partitions revoked: %s", sorted(str(tp) for tp in revoked))

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._state.assigned = set(assigned)
        self._state.group_joined = True
        logger.info("partitions assigned: %s", sorted(str(tp) for tp in assigned))

    def _drain(self) -> bool:
        """Score and publish the records in hand (the batch in flight and what poll() has
        returned), flush, commit, leave the group."""
        self._publish_all()
        while self._buffer:
            self._start_batch()
            self._publish_all()
        complete = self._flush_and_commit(timeout_s=self._config.drain_timeout_s)
        if not complete:
            logger.error("shutdown: some sends were not acknowledged; they will be re-delivered")
        return complete

    def _error(self, kind: str, exc: BaseException) -> None:
        self._metrics.errors.labels(kind=kind).inc()
        logger.warning("%s error: %s", kind, exc)
