"""The worker loop: poll, buffer, cut a batch, decode it, hand it to the scorer and to its owner.

A record's way from poll to commit, in 10 steps in 6 files, is tabled in docs/delivery.md:
this loop polls, cuts and decodes a batch and hands it to the scorer and to the batches' owner
(delivery.py), which publishes it once scored, settles its sends and commits.

Full batches are scored (in a child process on the CPU, on the CUDA stream on a GPU) while the
next is being collected. Everything from the cut to the commit belongs to one object, the
batches' owner (`Delivery`); the loop keeps only the records not cut yet.

Shutdown (and a send that fails for good) keeps to one deadline, `drain_timeout_s` from the
moment the loop stops: publishing what is in hand, the acks, the commit, the revoke that leaving
the group runs, and closing the clients (streams.worker_process) all share it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from operator import attrgetter
from typing import Any, Protocol

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import CorruptRecordError, KafkaError, UnsupportedCodecError
from kafka.structs import TopicPartition

from detector import Scores
from detector.preprocess import ImageDecoding
from streams.broker_refusals import BrokerRefusals
from streams.client_internals import coordinator_known, group_stable, unreadable_record
from streams.codec import DECODE_ERROR, UNREADABLE, DecodedBatch, decode_batch
from streams.config import StreamConfig
from streams.worker.batch import InFlightBatch, all_invalid
from streams.worker.delivery import Delivery
from streams.worker.metrics import WorkerMetrics
from streams.worker.publish import ResultPublisher
from streams.worker.rebalance import PartitionListener
from streams.worker.scoring import Scorer
from streams.worker.state import WorkerState
from streams.worker.transactions import Transactions

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
_TP = attrgetter("topic", "partition")


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
        transactions: Transactions | None = None,
        images: ImageDecoding | None = None,
    ) -> None:
        self._config = config
        self._images = images  # the image codec's preprocessing: the serving bundle's
        self._lifecycle = lifecycle  # hot reload, shadow, drift (streams/lifecycle/)
        self._consumer = consumer
        self._metrics = metrics
        self._state = state
        self._delivery = Delivery(
            config=config,
            consumer=consumer,
            producer=producer,
            metrics=metrics,
            state=state,
            on_error=self._error,
            on_published=self._published,
            transactions=transactions,
        )
        self._refusals = BrokerRefusals(consumer=consumer, config=config)
        self._buffer: list[Any] = []
        self._polled_at = 0.0
        self._use(scorer, publisher)
        self.on_batch_scored: Callable[[int], None] | None = None  # for benchmarks
        state.liveness_timeout_s = config.liveness_timeout_s

    @property
    def shutdown_deadline(self) -> float | None:
        """time.monotonic() the shutdown must end by; None while running."""
        return self._delivery.shutdown_deadline

    # -- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> bool:
        """Consume until `stop` is set, then drain. True when everything was committed."""
        delivery = self._delivery
        stable = group_stable(self._consumer)
        if stable is not None:
            self._state.group_stable = stable
        listener = PartitionListener(delivery=delivery, state=self._state)
        self._consumer.subscribe([self._config.input_topic], listener=listener)
        self._fetch_input_metadata()
        self._state.progressed(has_work=False)
        self._state.loop_running = True
        try:
            while not stop.is_set() and delivery.failure is None:
                self._fill_buffer(stop)
                delivery.publish_ready()
                if self._buffer and not delivery.held_back() and delivery.failure is None:
                    if delivery.in_scoring >= self._depth:  # the scorer has enough: wait
                        delivery.publish_oldest()
                    full = self._start_batch() == self._config.max_batch_size
                    if not full or not self._scorer.overlaps:
                        # Inline scoring is done already; a batch cut by its deadline means the
                        # worker has caught up, and publishing it now spares its alerts a poll.
                        delivery.publish_all()
            delivery.start_shutdown()
            if delivery.failure is not None:
                delivery.stop_on_failure()
                return False
            return self._drain()
        finally:
            self._state.loop_running = False

    def _fetch_input_metadata(self) -> None:
        """Have the input topic's partitions in the consumer's metadata before the first poll
        joins the group. kafka-python's leader assigns from the metadata it holds at the join;
        when the topic is missing there, it can keep an empty assignment for good (as in
        dpkp/kafka-python#2377). Fetched after subscribe(), this costs no second rebalance."""
        topic = self._config.input_topic
        try:
            partitions = self._consumer.partitions_for_topic(topic)
        except KafkaError as exc:
            self._error("broker", exc)
            return
        if not partitions:
            logger.warning(
                "input topic %s has no partitions in the broker's metadata (not created yet?); "
                "they are assigned once it exists",
                topic,
            )

    def _use(self, scorer: Scorer, publisher: ResultPublisher) -> None:
        """Score the next batches with `scorer` and name its model in their outputs, once the
        batches the previous scorer holds are published."""
        self._delivery.publish_all()
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
            if self._images is not None:  # image files as the new bundle makes them its input
                self._images = self._images.with_preprocessing(candidate.detector.preprocessing)
            self._lifecycle.swapped(candidate, old_scorer=old)

    def _poll(self, timeout_ms: int) -> dict:
        unreadable: KafkaError | None = None
        try:
            polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=self._poll_records)
        except (CorruptRecordError, UnsupportedCodecError) as exc:
            polled, unreadable = {}, exc
        except KafkaError as exc:  # logged in one line per cause, not at every poll
            self._metrics.count_error("broker", exc)
            self._refusals.poll_failed(exc)
            self._state.broker_connected = False
            self._state.authorized = self._refusals.authorized
            time.sleep(0.1)
            polled = {}
        else:
            self._state.broker_connected = coordinator_known(self._consumer)
            self._state.authorized = self._refusals.poll_succeeded()
        self._drop_forgotten()  # by a rebalance inside that poll
        if unreadable is not None:
            self._skip_unreadable(unreadable)
        return polled

    def _drop_forgotten(self) -> None:
        """Buffered records of partitions the batches' owner forgot (a rebalance, an aborted
        transaction) are stale: the consumer was sought back to where they are read again."""
        forgotten = self._delivery.take_forgotten()
        if forgotten:
            self._buffer = [r for r in self._buffer if TopicPartition(*_TP(r)) not in forgotten]

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
        decoded = all_invalid(1, UNREADABLE, exc)
        now = time.time()
        self._delivery.open(
            [record], decoded, None, publisher=self._publisher, polled_at=now, cut_at=now
        )
        self._delivery.publish_all()
        self._consumer.seek(TopicPartition(record.topic, record.partition), record.offset + 1)

    def _fill_buffer(self, stop: threading.Event) -> None:
        """Poll until the buffer holds max_batch_size records or its first record has waited
        max_batch_delay_ms; meanwhile publish scored batches and service acks and commits."""
        size = self._config.max_batch_size
        delay_s = self._config.max_batch_delay_ms / 1000.0
        first_at = time.monotonic() if self._buffer else None
        delivery = self._delivery
        while not stop.is_set() and delivery.failure is None:
            held = self._service()
            self._swap_if_ready()
            if len(self._buffer) >= size and not held:
                return
            # Short polls only while a batch is being scored (to publish it as soon as it is
            # done) or while sends await acks; every poll costs a round trip to kafka-python.
            if delivery.in_scoring:
                timeout_ms = _SERVICE_POLL_MS
            elif held or (delivery.sending and not self._buffer):
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
            delivery.consumed(polled)
            for records in polled.values():
                self._buffer.extend(records)
            if self._buffer and first_at is None:
                first_at = time.monotonic()
            delivery.publish_ready()
            if first_at is not None and delay_s == 0 and not held:
                return

    def _start_batch(self) -> int:
        """Cut the next batch from the buffer, decode it, submit it to the scorer and hand it
        to its owner; returns its size."""
        size = self._config.max_batch_size
        records, self._buffer = self._buffer[:size], self._buffer[size:]
        cut_at = time.time()  # before decoding and scoring, which a caught-up batch does here
        try:
            decoded = decode_batch(
                [r.value for r in records],
                codec=self._config.codec,
                keys=[r.key for r in records],
                images=self._images,
            )
        except Exception as exc:  # a decoder bug must not lose records: dead-letter them all
            self._error("decode", exc)
            decoded = all_invalid(len(records), DECODE_ERROR, exc)
        self._metrics.batch_size.observe(len(records))
        caught_up = len(records) < size
        scoring = (
            self._scorer.submit(decoded.images, caught_up=caught_up) if decoded.n_valid else None
        )
        self._delivery.open(
            records,
            decoded,
            scoring,
            publisher=self._publisher,
            polled_at=self._polled_at,
            cut_at=cut_at,
        )
        return len(records)

    def _published(
        self, batch: InFlightBatch, decoded: DecodedBatch, scores: Scores | None
    ) -> None:
        """A batch's outputs were handed to the producer."""
        if self._lifecycle is not None and scores is not None:
            self._lifecycle.observe_batch(batch.records, decoded, scores)
        self._state.progressed(has_work=True)
        if self.on_batch_scored is not None:
            self.on_batch_scored(len(batch.records))

    def _service(self) -> bool:
        """Take acks, commit on the timer, pause or resume; returns whether consuming is held
        back. Acks count as progress for /healthz; so does being idle."""
        delivery = self._delivery
        acked = delivery.take_acks()
        held = delivery.tick()
        self._drop_forgotten()  # an aborted transaction forgets every partition
        busy = bool(self._buffer or delivery.in_scoring or delivery.has_work)
        if acked or not busy:
            self._state.progressed(has_work=busy)
        else:
            self._state.has_work = True
        return held

    # -- shutdown (rebalances: streams.worker.rebalance) -----------------------------------

    def _score_buffered(self) -> None:
        """Score and publish everything in hand."""
        self._delivery.publish_all()
        while self._buffer:
            self._start_batch()
            self._delivery.publish_all()

    def _drain(self) -> bool:
        """Score and publish what is in hand, wait for the acks, commit (all by the shutdown
        deadline). True only when every record consumed was acknowledged and committed."""
        delivery = self._delivery
        self._score_buffered()
        # The acks may take three quarters of what is left: the commit and closing the
        # clients need the rest.
        delivery.await_acks(time.monotonic() + 0.75 * delivery.time_left())
        if delivery.failure is not None:
            logger.error("%s", delivery.failure)
        committed = delivery.commit(timeout_s=delivery.time_left())
        complete = committed and not delivery.has_work
        if not complete:
            logger.error("shutdown: some outputs were not acknowledged; not committed")
        return complete

    def _error(self, kind: str, exc: BaseException) -> None:
        self._metrics.count_error(kind, exc)
        logger.warning("%s error: %s", kind, exc)
