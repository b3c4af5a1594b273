"""Exactly-once (stream.processing_guarantee=exactly_once): the outputs of a set of batches and
their input offsets committed in one Kafka transaction.

The batches' owner (delivery.py) opens a transaction before it sends a batch's outputs and
commits it every transaction_interval_ms, at a revoke and at shutdown, with the offsets of the
batches sent in it (`send_offsets_to_transaction` with the consumer's group metadata, so that a
member the group has moved on from is fenced: KIP-447). Whatever fails inside a transaction
aborts it; the owner then seeks back to the last committed offsets and consumes again.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError, TransactionalIdAuthorizationFailedError
from kafka.structs import OffsetAndMetadata, TopicPartition

from streams.client_internals import (
    abort_transaction_within,
    commit_transaction_within,
    send_offsets_within,
)
from streams.config import StreamConfig
from streams.worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)


class TransactionsUnavailableError(RuntimeError):
    """exactly_once was chosen and the broker cannot run transactions."""


def transactional_id(config: StreamConfig) -> str:
    return config.transactional_id or f"{config.group_id}-{socket.gethostname()}"


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

    def abort(self, reason: object, *, timeout_s: float) -> None:
        """Abort the open transaction: none of its outputs and offsets ever become visible.
        Raises KafkaError when even that fails (the worker then stops; the broker aborts the
        transaction after transaction_timeout_ms, or at once when the worker restarts)."""
        if not self.open:
            return
        logger.error("aborting the transaction: %s", reason)
        self.open = False
        self._metrics.transactions.labels(outcome="aborted").inc()
        abort_transaction_within(self._producer, timeout_ms=max(1, int(timeout_s * 1000)))


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
