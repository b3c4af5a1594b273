"""Exactly-once (stream.processing_guarantee=exactly_once): the outputs of a set of batches and
their input offsets committed in one Kafka transaction.

The batches' owner (delivery.py) opens a transaction before it sends a batch's outputs and
commits it every transaction_interval_ms, at a revoke and at shutdown, with the offsets of the
batches sent in it (`send_offsets_to_transaction` with the consumer's group metadata, so that a
member the group has moved on from is fenced: KIP-447). Whatever fails inside a transaction
aborts it; the owner then seeks back to the last committed offsets and consumes again.

Because the group's generation fences zombies, the transactional id need not be stable: by
default each worker process gets one of its own, so that workers on one host never fence each
other (stream.transactional_id sets a stable one instead).

A transaction that a failed send doomed is aborted by replacing the producer with a fresh one
under the same transactional id (`TransactionalProducer.renew`): its InitProducerId aborts the
transaction on the broker and starts clean sequence numbers. kafka-python 3.0 does not take
back the sequence number of a batch the broker refused, so the old producer's next batch on
that partition fails with OUT_OF_ORDER_SEQUENCE_NUMBER and the one after cannot be aborted
(KAFKA_PYTHON_SEQUENCE_GAP in streams/client_internals.py). A producer that kafka-python made
unusable for good is replaced the same way when it was fenced by the broker (its transaction
timed out); with a stable id from the settings, being fenced can also mean that another worker
uses that id, and the worker stops with a one-line reason (exit 1) rather than fence it back.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import (
    InvalidProducerEpochError,
    KafkaError,
    ProducerFencedError,
    TransactionalIdAuthorizationFailedError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition

from streams.client_internals import (
    abort_transaction_within,
    commit_transaction_within,
    fatal_error,
    force_close_producer,
    send_offsets_within,
)
from streams.config import StreamConfig
from streams.kafka_io import create_producer
from streams.worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)


class TransactionsUnavailableError(RuntimeError):
    """exactly_once was chosen and the broker cannot run transactions."""


class ProducerFailedError(RuntimeError):
    """The transactional producer cannot go on and cannot be replaced (one line: the reason)."""


# What the broker answers a producer whose epoch is no longer the transactional id's: another
# producer initialised the id, or the coordinator aborted its timed-out transaction. kafka-python
# 3.0 counts INVALID_PRODUCER_EPOCH on a send as recoverable and bumps the epoch with the same
# id: with a stable id that fences the other worker back, and the two take turns (seen in
# test_a_worker_fenced_by_another_with_its_stable_transactional_id_says_so_and_exits).
FENCED = (ProducerFencedError, InvalidProducerEpochError)


def transactional_id(config: StreamConfig) -> str:
    """stream.transactional_id, or (empty) one of this process's own:
    <group_id>-<host name>-<8 random hex digits>."""
    own = f"{config.group_id}-{socket.gethostname()}-{secrets.token_hex(4)}"
    return config.transactional_id or own


class TransactionalProducer:
    """The worker's transactional KafkaProducer (everything not defined here is the current
    one's), which `renew` replaces by a fresh one under the same transactional id. The
    publisher, the batches' owner and the transactions all hold this object, so they all send
    through the fresh one at once."""

    def __init__(self, config: StreamConfig, make: Callable[..., Any] = create_producer) -> None:
        self._config = config
        self._make = make
        self.transactional_id = transactional_id(config)
        self.current = make(config=config, transactional_id=self.transactional_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current, name)

    def renew(self) -> None:
        """A fresh producer in place of the current one, whose outstanding sends (all of the
        aborted transaction) fail; it still needs init_transactions."""
        old = self.current
        self.current = self._make(config=self._config, transactional_id=self.transactional_id)
        force_close_producer(old)
        try:
            old.close(timeout=1.0)
        except KafkaError as exc:
            logger.warning("closing the replaced producer: %s", exc)


class Transactions:
    def __init__(
        self,
        *,
        producer: KafkaProducer,
        consumer: KafkaConsumer,
        config: StreamConfig,
        metrics: WorkerMetrics,
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        self._producer = producer
        self._consumer = consumer
        self._stable_id = bool(config.transactional_id)
        self._interval_s = config.transaction_interval_ms / 1000.0
        self._metrics = metrics
        self._on_error = on_error
        self.open = False
        self._opened_at = 0.0

    def init(self) -> None:
        """Fence the transactions a previous worker with the same transactional id left open.
        Raises TransactionsUnavailableError, one line, when the broker has no transactions."""
        try:
            self._producer.init_transactions()
        except TransactionalIdAuthorizationFailedError:
            tx_id = self._producer.config.get("transactional_id")  # the one it asked for
            raise TransactionsUnavailableError(
                f"stream.processing_guarantee=exactly_once: not authorized for transactional id "
                f"{tx_id!r} (TransactionalIdAuthorizationFailedError): grant WRITE on it "
                "(`vaewatch acls` lists what the worker needs)"
            ) from None
        except KafkaError as exc:
            raise TransactionsUnavailableError(
                "stream.processing_guarantee=exactly_once needs a broker with transactions: "
                f"initialising them failed ({type(exc).__name__}: {exc})"
            ) from None

    def begin(self) -> None:
        if not self.open:
            self._producer.begin_transaction()
            self.open, self._opened_at = True, time.monotonic()

    def due(self) -> bool:
        return self.open and time.monotonic() - self._opened_at >= self._interval_s

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata], *, timeout_s: float) -> None:
        """Add `offsets` to the transaction and commit it; raises KafkaError (the caller aborts)."""
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s

        def left_ms() -> int:
            return max(1, int((deadline - time.monotonic()) * 1000))

        if offsets:
            metadata = self._consumer.group_metadata()
            send_offsets_within(self._producer, offsets, metadata, timeout_ms=left_ms())
        commit_transaction_within(self._producer, timeout_ms=left_ms())
        self.open = False
        self._metrics.transactions.labels(outcome="committed").inc()
        self._metrics.transaction_commit_seconds.observe(time.perf_counter() - started)

    def abort(
        self,
        reason: object,
        *,
        timeout_s: float,
        renew: bool = False,
        cause: BaseException | None = None,
    ) -> None:
        """Abort the open transaction: none of its outputs and offsets ever become visible.
        `renew` (after a send the broker answered with a failure), or a producer kafka-python
        has made unusable for good: by a fresh producer's InitProducerId instead (`_renew`).
        Raises KafkaError when even that fails (the worker then stops; the broker aborts the
        transaction after transaction_timeout_ms, or at once when the worker restarts), and
        ProducerFailedError where a fresh producer cannot help. `cause`: the error that failed
        the transaction; one that says the producer was fenced (FENCED) counts as fatal."""
        if not self.open:
            return
        logger.error("aborting the transaction: %s", reason)
        self.open = False
        self._metrics.transactions.labels(outcome="aborted").inc()
        failed = fatal_error(self._producer) or (cause if isinstance(cause, FENCED) else None)
        if failed is not None or (renew and hasattr(self._producer, "renew")):
            self._renew(failed)
            return
        abort_transaction_within(self._producer, timeout_ms=max(1, int(timeout_s * 1000)))

    def recover(self, failed: KafkaError) -> None:
        """After an abort that raised `failed`: a producer kafka-python made unusable for good
        meanwhile is replaced (`_renew`); otherwise (the broker did not answer in time)
        `failed` is raised again."""
        cause = fatal_error(self._producer)
        if cause is None:
            raise failed
        self._renew(cause)

    def _renew(self, cause: BaseException | None) -> None:
        """A fresh producer under the same transactional id (TransactionalProducer.renew),
        initialised: its InitProducerId aborts what the old one left open. A producer that
        failed for good says why in one line first. Raises ProducerFailedError (one line) where
        a fresh one cannot help: an id or cluster the ACLs deny, a stable transactional id
        that another worker may hold (fencing it back would make them take turns). `cause`:
        what made the producer fail for good, or said it was fenced; None after a send the
        broker refused (the abort alone needs the fresh producer)."""
        renew = getattr(self._producer, "renew", None)
        if cause is not None:
            name = type(cause).__name__
            tid = getattr(self._producer, "transactional_id", "?")
            if "Authorization" in name:
                raise ProducerFailedError(f"the producer is not authorized ({name}: {cause})")
            if self._stable_id:
                raise ProducerFailedError(
                    f"fenced ({name}): another producer uses stream.transactional_id {tid!r} "
                    "(a second worker with the same setting, or this one's transaction timed "
                    "out): stopping rather than fencing it back; give each worker its own id, "
                    "or leave it empty for one per process"
                )
            if renew is None:
                raise ProducerFailedError(f"the producer failed for good ({name}: {cause})")
            logger.error(
                "the producer was fenced (%s: %s): the broker timed its transaction out; a new "
                "producer with transactional id %s goes on",
                name,
                cause,
                tid,
            )
        assert renew is not None
        renew()
        self.init()


def start_transactions(
    *,
    producer: KafkaProducer,
    consumer: KafkaConsumer,
    config: StreamConfig,
    metrics: WorkerMetrics,
) -> Transactions:
    """The worker's transactions, initialised (raises TransactionsUnavailableError)."""
    transactions = Transactions(
        producer=producer,
        consumer=consumer,
        config=config,
        metrics=metrics,
        on_error=metrics.count_error,
    )
    transactions.init()
    return transactions
