"""Every use of a client library's private API, in one place.

Each function names the public API that is missing. The versions they were written against are
pinned in pyproject.toml (kafka-python 3.0.x, prometheus-client >= 0.20), and
tests/streams/test_client_internals.py fails when an installed version no longer has one of
these attributes, before the worker meets it.

Workarounds of kafka-python behaviour, each pinned by a test there that fails once a release
changes it (the workaround can then go):

- IDEMPOTENT_PRODUCER_DIES: kafka-python 3.0.12 classifies a non-retriable broker error (a
  record too large for its topic, a null key for a compacted topic, a timestamp out of range,
  a topic the ACLs deny) on an idempotent, non-transactional producer as fatal
  (`TransactionManager.classify_batch_error`): its sender then fails every batch in flight and
  every later send with that error. Java's producer fails only the refused batch (and splits
  one that is too large). So the at-least-once producer is not idempotent
  (streams/kafka_io.py, create_producer): pinned by
  `test_kafka_pythons_idempotent_producer_dies_of_one_refused_record`.
- KAFKA_PYTHON_SEQUENCE_GAP: a transactional producer keeps the sequence number of a batch the
  broker refused, so after the abort its next batch on that partition fails with
  OUT_OF_ORDER_SEQUENCE_NUMBER, and kafka-python's epoch bump then leaves the transaction
  unabortable. So a transaction a refused send doomed is aborted by a fresh producer under
  the same transactional id (streams/worker/transactions.py, `TransactionalProducer.renew`):
  pinned by `test_after_a_refused_batch_the_partitions_next_transaction_fails`.
- In a transaction, one refused batch makes kafka-python abort the batches still waiting in the
  producer with that batch's own exception (Java's does the same): `aborted_by_client` tells the
  refused record from the ones failed with it
  (`test_a_failed_transaction_fails_the_waiting_batches_with_the_refused_records_error`).
- A send to a topic whose metadata the ACLs refuse fails before it reaches the producer's
  buffer, and leaves a transaction usable (Java's send() makes the transaction abortable):
  `failed_before_sending` tells it apart, so exactly-once replaces that output inside the same
  transaction instead of aborting it; pinned by
  `test_kafka_python_fails_a_send_to_a_topic_it_may_not_describe_outside_the_transaction`
  in tests/streams/test_secured_failures.py (it needs the broker with an authorizer).
- SENDER_SPINS_AT_MAX_IN_FLIGHT: kafka-python 3.0.12's `connection_delay` is 0 for a connected
  node, also one paused at max_in_flight_requests_per_connection, so the sender of a producer
  with that many requests unanswered polls with a 0 ms timeout: a busy loop that holds the GIL
  while a broker is slow or frozen (the non-idempotent producer meets it; Java's
  NetworkClient.connectionDelay is "forever" for a connected node, and an answer wakes the
  poll). The clients made by `recording_kafka_client` wait for an answer instead; pinned by
  `test_kafka_pythons_connection_delay_is_zero_for_a_connected_node`. Without it a shutdown
  against a frozen broker overran drain_timeout_s by a second
  (tests/streams/worker/test_worker_faults.py).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaTimeoutError
from kafka.net.compat import KafkaNetClient
from kafka.structs import OffsetAndMetadata, TopicPartition
from prometheus_client import Histogram


def group_stable(consumer: KafkaConsumer) -> Callable[[], bool] | None:
    """Whether the consumer's group membership is stable (joined, not rebalancing). Java's
    client has no such call either; kafka-python 3.0's coordinator has `stable()`. None when
    this client lacks it (a fake in tests)."""
    coordinator = getattr(consumer, "_coordinator", None)
    stable = getattr(coordinator, "stable", None)
    return stable if callable(stable) else None


def coordinator_known(consumer: KafkaConsumer) -> bool:
    """Whether the group coordinator is known, i.e. the broker answers the group. No public
    API: kafka-python's `bootstrap_connected()` says only that a connection once succeeded."""
    unknown = getattr(getattr(consumer, "_coordinator", None), "coordinator_unknown", None)
    return not unknown() if callable(unknown) else True


async def commit_in_listener(
    consumer: KafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata], *, timeout_ms: int
) -> None:
    """Commit `offsets` from inside a rebalance listener. kafka-python 3 runs the listener on
    its I/O thread, where the blocking `commit()` is refused, and offers no public awaitable
    commit (Java's consumer allows commitSync in onPartitionsRevoked)."""
    await consumer._coordinator._commit_offsets_sync_async(offsets, timeout_ms=timeout_ms)


def unreadable_record(consumer: KafkaConsumer) -> ConsumerRecord | None:
    """The record kafka-python's poll() just failed to parse (corrupt, a header name that is
    not UTF-8, a compression codec it lacks), as a record with its coordinates only: its bytes
    cannot be had. Read from the consumer's fetcher: the exception does not name the record
    (Java's RecordDeserializationException carries its partition and offset). None when it
    cannot be told."""
    part = getattr(getattr(consumer, "_fetcher", None), "_next_partition_records", None)
    tp = getattr(part, "topic_partition", None)
    offset = getattr(part, "next_fetch_offset", None)
    if not isinstance(tp, TopicPartition) or not isinstance(offset, int):
        return None
    return ConsumerRecord(
        tp.topic, tp.partition, -1, offset, None, 0, None, None, [], None, -1, -1, -1
    )


def force_close_producer(producer: KafkaProducer) -> None:
    """Stop the producer's sender without waiting for outstanding sends: what `close(timeout)`
    does after its own timeout, when that timeout raised first (no public force-close)."""
    producer._sender.force_close()


def aborted_by_client(future: Any) -> bool:
    """Whether a failed send was failed by the producer itself, because another batch was
    refused in its transaction (or the producer was closed by force), rather than refused by
    the broker: both carry the same exception. No client has a public API for it (Java's
    callbacks get the same exception too). kafka-python 3.0 completes an aborted batch with
    base offset -1 (`ProducerBatch.abort`), one the broker answered with None."""
    value = getattr(getattr(future, "_produce_future", None), "value", None)
    return isinstance(value, tuple) and len(value) == 3 and value[0] == -1


def failed_before_sending(future: Any) -> bool:
    """Whether a failed send never reached the producer's buffer (nor its transaction):
    kafka-python 3.0's send() returns a future failed already, rather than raising, when the
    broker refuses the topic's metadata (TopicAuthorizationFailedError: no ACL lets the client
    describe it); the produce result behind that future never completes. No client has a
    public API for it."""
    produce = getattr(future, "_produce_future", None)
    return produce is not None and not produce.is_done and future.is_done and future.failed()


def fatal_error(producer: KafkaProducer) -> BaseException | None:
    """The error that made a transactional producer unusable for good (fenced by a newer
    producer with its transactional id, not authorized, ...), or None while it can still abort
    and go on. kafka-python only raises it again from each call; Java's producer has no query
    either (its calls throw ProducerFencedException and the like)."""
    manager = getattr(producer, "_transaction_manager", None)
    has_fatal = getattr(manager, "has_fatal_error", None)
    if not callable(has_fatal) or not has_fatal():
        return None
    return manager.last_error or RuntimeError("the producer failed for good")


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """Observe a whole array at once: one bincount instead of a locked Python call per value
    (the worker observes every record's score and latency; at 50,000 records/s that matters).
    Same result as calling histogram.observe(v) for each finite v. prometheus_client has no
    bulk observe, so this adds to the histogram's bucket counters and sum directly."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    bounds: Any = getattr(histogram, "_upper_bounds", None)
    buckets: Any = getattr(histogram, "_buckets", None)
    if bounds is None or buckets is None:  # a labelled parent or another client version
        for value in values.tolist():
            histogram.observe(value)
        return
    index = np.searchsorted(np.asarray(bounds, dtype=np.float64), values, side="left")
    counts = np.bincount(np.minimum(index, len(bounds) - 1), minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))
    histogram._sum.inc(float(values.sum()))


def _finish_transaction_step(
    producer: KafkaProducer, result: Any, timeout_ms: int, what: str
) -> None:
    producer._sender.wakeup()
    if not result.wait(timeout_ms=timeout_ms):
        raise KafkaTimeoutError(f"{what} did not complete in {timeout_ms} ms")


def send_offsets_within(
    producer: KafkaProducer, offsets: dict, group_metadata: Any, *, timeout_ms: int
) -> None:
    """`send_offsets_to_transaction`, bounded: kafka-python's waits without a timeout (Java's
    producer bounds it by max.block.ms), which would let a frozen broker hold a shutdown."""
    manager = producer._transaction_manager
    result = manager.send_offsets_to_transaction(offsets, group_metadata)
    _finish_transaction_step(producer, result, timeout_ms, "sending the offsets to the transaction")


def commit_transaction_within(producer: KafkaProducer, *, timeout_ms: int) -> None:
    """`commit_transaction`, bounded (see send_offsets_within)."""
    result = producer._transaction_manager.begin_commit()
    _finish_transaction_step(producer, result, timeout_ms, "committing the transaction")


def abort_transaction_within(producer: KafkaProducer, *, timeout_ms: int) -> None:
    """`abort_transaction`, bounded (see send_offsets_within)."""
    result = producer._transaction_manager.begin_abort()
    _finish_transaction_step(producer, result, timeout_ms, "aborting the transaction")


def recording_kafka_client(
    on_failure: Callable[[BaseException, int], None], *, slow_step_s: float
) -> Callable[..., Any]:
    """A factory for kafka-python's documented `kafka_client` option (consumer, producer and
    admin client alike) whose connections hand the exception that ended their set-up (a TLS
    handshake, a SASL authentication, a refused connection) to `on_failure`, with the number of
    requests the connection had sent by then. kafka-python has no public API for it: a
    bootstrap that fails raises only KafkaTimeoutError('Unable to bootstrap'), and the cause
    goes to its log (Java's client raises SslAuthenticationException or
    SaslAuthenticationException itself). Each connection is made by the connection manager's
    get_connection(), and its init_future fails with the cause; a connection closed by an error
    after its set-up went through is reported with the count negated.

    The count tells a connection that the broker closed during SASL authentication (ApiVersions,
    SaslHandshake, then SaslAuthenticate: three or more) from one it closed earlier: when the
    broker's refusal and its close arrive in one read, kafka-python 3.0.12 drops the refusal
    and reports only 'socket disconnected' (its transport's _read_from_sock aborts before
    handing over the data read with the end of the stream).

    Its I/O loop warns about a step ("It is blocking the event loop") only when the step ran
    over `slow_step_s`. Missing public API: the clients have no option for their selector's
    `slow_task_threshold_secs` (0.1 s), a wall-clock watchdog for livelocks in kafka-python's
    own coroutines that a busy machine, or another thread holding the GIL, trips with any
    step."""
    from kafka.net.manager import KafkaConnectionManager
    from kafka.net.selector import NetworkSelector

    def requests_sent(connection: Any) -> int:
        return int(getattr(getattr(connection, "parser", None), "_correlation_id", 0) or 0)

    class RecordingManager(KafkaConnectionManager):
        def get_connection(self, *args: Any, **kwargs: Any) -> Any:
            connection = super().get_connection(*args, **kwargs)
            if not connection.init_future.is_done:
                connection.init_future.add_errback(
                    lambda exc: on_failure(exc, requests_sent(connection))
                )
                # Closed by an error after a set-up that went through: a listener that
                # answered ApiVersions but wanted SASL first.
                connection.init_future.add_callback(
                    lambda _: connection.close_future.add_errback(
                        lambda exc: on_failure(exc, -requests_sent(connection))
                    )
                )
            return connection

    def make_client(**configs: Any) -> KafkaNetClient:
        net = NetworkSelector(**{**configs, "slow_task_threshold_secs": slow_step_s})
        return _WaitingNetClient(net=net, manager=RecordingManager(net, **configs), **configs)

    return make_client


class _WaitingNetClient(KafkaNetClient):
    """SENDER_SPINS_AT_MAX_IN_FLIGHT (module docstring): a connected node whose requests in
    flight are at the limit is not ready until an answer comes, and the answer ends the
    sender's poll; until then it may wait as long as a request may take. The sender reads the
    delay in milliseconds (kafka.producer.sender, `_send_producer_data`)."""

    def connection_delay(self, node_id: Any) -> float:
        connection = self._manager._conns.get(node_id)
        if connection is not None and connection.connected and connection.paused:
            return float(self._manager.config["request_timeout_ms"])
        return super().connection_delay(node_id)


def certificate_dates(path: str) -> tuple[str, str] | None:
    """(notBefore, notAfter) of the first certificate in a PEM file, as the ssl module spells
    them ('Dec  5 12:00:00 2026 GMT'); None when it cannot be read. The ssl module has no public
    call that reads a certificate file (getpeercert() reads only a peer's): this is the helper
    CPython's own tests use."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        fields = decode(path)
    except (OSError, ssl.SSLError, ValueError):
        return None
    return fields.get("notBefore", ""), fields.get("notAfter", "")


def unauthorized_topics(consumer: KafkaConsumer) -> set[str]:
    """The topics the last metadata answer refused this client (TOPIC_AUTHORIZATION_FAILED).
    kafka-python keeps them in its cluster metadata and logs them, but its consumer neither
    raises nor reports them: a subscription to a topic it may not read is just assigned nothing
    (Java's consumer raises TopicAuthorizationException from poll())."""
    cluster = getattr(getattr(consumer, "_client", None), "cluster", None)
    return set(getattr(cluster, "unauthorized_topics", ()) or ())


def request_metadata_update(consumer: KafkaConsumer) -> None:
    """Ask for fresh metadata at the next poll. kafka-python refreshes a refused topic only
    every metadata_max_age_ms (5 minutes): this lets an ACL granted meanwhile take effect
    within seconds (Java's consumer has no public call either)."""
    cluster = getattr(getattr(consumer, "_client", None), "cluster", None)
    request = getattr(cluster, "request_update", None)
    if callable(request):
        request()
