"""The worker loop: poll, decode, score, publish, commit, with at-least-once delivery.

A record's way from poll to commit: `_fill_buffer` polls it into the buffer; `_start_batch` cuts
a batch, decodes it, opens it with the ack tracker and submits it to the scorer;
`_publish_oldest` takes its scores and publishes its outputs; the ack tracker (streams.worker.acks)
settles the batch once the broker has acknowledged every output, and its offset ledger then
lets the offsets be committed, in order. Full batches are scored (in a child process on the
CPU, on the CUDA stream on a GPU) while the next is being collected.

Shutdown (and a send that fails for good) keeps to one deadline, `drain_timeout_s` from the
moment the loop stops: publishing what is in hand, the acks, the commit, the revoke that leaving
the group runs, and closing the clients (streams.worker_process) all share it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import CorruptRecordError, KafkaError, UnsupportedCodecError
from kafka.structs import TopicPartition

from detector import Scores
from streams.client_internals import coordinator_known, group_stable, unreadable_record
from streams.codec import DECODE_ERROR, SCORING_ERROR, UNREADABLE, DecodedBatch, decode_batch
from streams.config import StreamConfig
from streams.worker.acks import AckTracker
from streams.worker.delivery import UnsendableError
from streams.worker.metrics import WorkerMetrics
from streams.worker.publish import ResultPublisher
from streams.worker.rebalance import PartitionListener
from streams.worker.scoring import PendingBatch, Scorer
from streams.worker.state import WorkerState

__all__ = ["ModelSwaps", "Worker", "WorkerState"]


class ModelSwaps(Protocol):
    """The seam through which the model lifecycle (streams/lifecycle/) plugs into the loop:
    the loop asks for a new model between batches and reports each scored batch."""

    def take_swap(self) -> Any:
        """A candidate (its `prepared` scorer and `detector`) ready to take over, or None."""

    def publisher_for(self, detector: Any) -> ResultPublisher: ...

    def swapped(self, candidate: Any, *, old_scorer: Any = None) -> None: ...

    def observe_batch(self, records: Any, decoded: DecodedBatch, scores: Scores) -> None: ...


logger = logging.getLogger(__name__)

_SERVICE_POLL_MS = 2  # poll timeout while a batch is being scored
_ACK_POLL_MS = 10  # poll timeout while sends await their acks, or while paused
_IDLE_POLL_MS = 100
# With inline scoring, poll() takes up to this many batches at once: kafka-python sends the next
# fetch only once its buffered fetch data has been handed over entirely, so taking all of it
# keeps a fetch in flight while the worker decodes and scores. An overlapping scorer gets one
# batch per poll instead, so that it is handed its next batch before it runs dry.
_POLL_BATCHES = 8
_SCORING_DEPTH = 2  # batches handed to an overlapping scorer: one being scored, one queued


@dataclass
class _Batch:
    batch_id: int
    records: list[Any]
    decoded: DecodedBatch
    scoring: PendingBatch | None
    polled_at: float  # time.time() when poll() returned the oldest records of the buffer
    cut_at: float  # time.time() when it was cut from the buffer


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
        lifecycle: ModelSwaps | None = None,
    ) -> None:
        self._config = config
        self._lifecycle = lifecycle  # hot reload, shadow, drift (streams/lifecycle/)
        self._consumer = consumer
        self._metrics = metrics
        self._state = state
        self._acks = AckTracker(
            config=config,
            consumer=consumer,
            producer=producer,
            publisher=publisher,
            metrics=metrics,
            state=state,
            on_error=self._error,
        )
        self._buffer: list[Any] = []
        self._scoring: deque[_Batch] = deque()
        self._polled_at = 0.0
        self._use(scorer, publisher)
        self.shutdown_deadline: float | None = None  # time.monotonic() the shutdown must end by
        self.on_batch_scored: Callable[[int], None] | None = None  # for benchmarks
        state.liveness_timeout_s = config.liveness_timeout_s

    # -- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> bool:
        """Consume until `stop` is set, then drain. True when everything was committed."""
        stable = group_stable(self._consumer)
        if stable is not None:
            self._state.group_stable = stable
        listener = PartitionListener(
            acks=self._acks,
            state=self._state,
            publish_in_flight=self._publish_all,
            drop_buffered=self._drop_buffered,
            time_left=self._time_left,
        )
        self._await_input_metadata()
        self._consumer.subscribe([self._config.input_topic], listener=listener)
        self._state.progressed(has_work=False)
        self._state.loop_running = True
        try:
            while not stop.is_set():
                self._fill_buffer(stop)
                self._publish_scored()
                if self._buffer and not self._acks.held_back():
                    if len(self._scoring) >= self._depth:  # the scorer has enough: wait
                        self._publish_oldest()
                    full = self._start_batch() == self._config.max_batch_size
                    if not full or not self._scorer.overlaps:
                        # Inline scoring is done already; a batch cut by its deadline means the
                        # worker has caught up, and publishing it now spares its alerts a poll.
                        self._publish_all()
            self.shutdown_deadline = time.monotonic() + self._config.drain_timeout_s
            return self._drain()
        except UnsendableError as exc:
            logger.error("%s", exc)
            if self.shutdown_deadline is None:  # not already draining
                self.shutdown_deadline = time.monotonic() + self._config.drain_timeout_s
            self._acks.commit(timeout_s=self._time_left())  # what precedes the record only
            return False
        finally:
            self._state.loop_running = False

    def _await_input_metadata(self) -> None:
        """Fetch the input topic's partitions before joining the group: kafka-python's leader
        assigns from the metadata it holds at the join, and when a topic created a moment ago
        is missing there, it can keep an empty assignment until the metadata next changes."""
        topic = self._config.input_topic
        try:
            partitions = self._consumer.partitions_for_topic(topic)
        except KafkaError as exc:
            self._error("broker", exc)
            partitions = None
        if not partitions:
            logger.warning(
                "input topic %s has no partitions in the broker's metadata (not created yet?); "
                "they are assigned once it exists",
                topic,
            )

    def _use(self, scorer: Scorer, publisher: ResultPublisher) -> None:
        """Score the next batches with `scorer`, once every batch the previous one holds has
        been published with the previous publisher (so an output's model_version always names
        the model that scored it)."""
        self._publish_all()
        self._scorer, self._publisher = scorer, publisher
        self._depth = _SCORING_DEPTH if scorer.overlaps else 1
        self._poll_records = self._config.max_batch_size * (1 if scorer.overlaps else _POLL_BATCHES)

    @property
    def scorer(self) -> Scorer:
        """The scorer of the model that serves now (it changes at a hot swap)."""
        return self._scorer

    def _swap_if_ready(self) -> None:
        """A new model the lifecycle has loaded, verified and warmed up takes over, between two
        batches (also while idle, so the gauges follow at once)."""
        candidate = self._lifecycle.take_swap() if self._lifecycle is not None else None
        if candidate is not None:
            old = self._scorer
            self._use(candidate.prepared, self._lifecycle.publisher_for(candidate.detector))
            self._lifecycle.swapped(candidate, old_scorer=old)

    def _poll(self, timeout_ms: int) -> dict:
        try:
            polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=self._poll_records)
        except (CorruptRecordError, UnsupportedCodecError) as exc:
            self._skip_unreadable(exc)
            return {}
        except KafkaError as exc:
            self._error("broker", exc)
            self._state.broker_connected = False
            time.sleep(0.1)
            return {}
        self._state.broker_connected = coordinator_known(self._consumer)
        return polled

    def _skip_unreadable(self, exc: KafkaError) -> None:
        """kafka-python could not parse the record at a partition's position, and polled again
        it would spin on it for ever: dead-letter it (coordinates and error) and seek past it.
        What is in hand goes first: the ledger takes a partition's batches in offset order."""
        self._error("decode", exc)
        record = unreadable_record(self._consumer)
        if record is None:  # cannot tell which: stop, committing nothing past it
            raise exc
        logger.error(
            "%s:%d:%d unreadable, dead-lettered", record.topic, record.partition, record.offset
        )
        self._score_buffered()
        batch_id = self._acks.open([record])
        decoded = _all_invalid(1, UNREADABLE, exc)
        self._acks.sent(batch_id, self._publisher.publish([record], decoded, None))
        self._consumer.seek(TopicPartition(record.topic, record.partition), record.offset + 1)

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
            elif held or (self._acks.sending and not self._buffer):
                timeout_ms = _ACK_POLL_MS
            else:
                timeout_ms = _IDLE_POLL_MS
            if first_at is not None and not held:
                left_ms = (first_at + delay_s - time.monotonic()) * 1000.0
                if left_ms <= 0:
                    return
                timeout_ms = max(0, min(timeout_ms, int(left_ms)))
            polled = self._poll(timeout_ms)
            if polled and not self._buffer:
                self._polled_at = time.time()
            for tp, records in polled.items():
                self._acks.ledger.consumed_from(tp, records[0].offset)
                self._buffer.extend(records)
            if self._buffer and first_at is None:
                first_at = time.monotonic()
            self._publish_scored()
            if first_at is not None and delay_s == 0 and not held:
                return

    def _start_batch(self) -> int:
        """Cut the next batch from the buffer, decode it, open it with the ack tracker and
        submit it to the scorer; returns its size."""
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
        batch_id = self._acks.open(records)
        caught_up = len(records) < size
        scoring = (
            self._scorer.submit(decoded.images, caught_up=caught_up) if decoded.n_valid else None
        )
        self._scoring.append(
            _Batch(batch_id, records, decoded, scoring, self._polled_at, time.time())
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
        self._acks.sent(batch.batch_id, published)
        timestamps = published.timestamps_ms
        self._metrics.observe_stages(
            produced=timestamps.min() / 1e3 if len(timestamps) else None,
            polled=batch.polled_at,
            cut=batch.cut_at,
            scored=scored_at,
            sent=time.time(),
        )
        if self._lifecycle is not None and scores is not None:
            self._lifecycle.observe_batch(batch.records, decoded, scores)
        self._state.progressed(has_work=True)
        if self.on_batch_scored is not None:
            self.on_batch_scored(len(batch.records))

    def _service(self) -> bool:
        """Take acks, commit on the timer, pause or resume; returns whether consuming is held
        back. Acks count as progress for /healthz; so does being idle."""
        acked = self._acks.take_acks()
        busy = bool(self._buffer or self._scoring or self._acks.has_work)
        if acked or not busy:
            self._state.progressed(has_work=busy)
        else:
            self._state.has_work = True
        return self._acks.tick()

    # -- shutdown (and rebalances: streams.worker.rebalance) --------------------------------------

    def _time_left(self) -> float:
        """Seconds a blocking step may take: what is left of the shutdown, or (in a rebalance
        while running) drain_timeout_s."""
        if self.shutdown_deadline is None:
            return self._config.drain_timeout_s
        return max(0.0, self.shutdown_deadline - time.monotonic())

    def _drop_buffered(self, partitions: set[TopicPartition]) -> None:
        """Records of partitions this worker no longer owns (streams.worker.rebalance)."""
        self._buffer = [r for r in self._buffer if (r.topic, r.partition) not in partitions]

    def _score_buffered(self) -> None:
        """Score and publish everything in hand."""
        self._publish_all()
        while self._buffer:
            self._start_batch()
            self._publish_all()

    def _drain(self) -> bool:
        """Score and publish what is in hand, wait for the acks, commit (all by the shutdown
        deadline). True only when every record consumed was acknowledged and committed."""
        self._score_buffered()
        # The acks may take three quarters of what is left: the commit and closing the
        # clients need the rest.
        self._acks.await_acks(time.monotonic() + 0.75 * self._time_left())
        committed = self._acks.commit(timeout_s=self._time_left())
        complete = committed and not self._acks.has_work
        if not complete:
            logger.error("shutdown: some outputs were not acknowledged; not committed")
        return complete

    def _error(self, kind: str, exc: BaseException) -> None:
        self._metrics.count_error(kind, exc)
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
