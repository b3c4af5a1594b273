"""Thin wrappers around kafka-python's consumer and producer: settings in, clients out.

Every setting comes from StreamConfig; security settings are passed through unchanged. Errors
are reported through a typed callback (kind, exception) so the worker can count them by kind.
A client that cannot connect raises BrokerConnectionError, whose one line says why
(streams.connection_errors).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    NoError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    for_code,
)

from streams.client_internals import recording_kafka_client
from streams.config import StreamConfig
from streams.connection_errors import (
    BrokerConnectionError,
    ConnectionFailures,
    describe_connection_failure,
    one_line_connection_logs,
)
from streams.tls import check_client_tls_files

logger = logging.getLogger(__name__)

ErrorKind = Literal["broker", "produce", "commit", "decode", "scoring", "skipped"]
ErrorCallback = Callable[[ErrorKind, BaseException], None]
Headers = list[tuple[str, bytes]]


def security_options(config: StreamConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"security_protocol": config.security_protocol}
    if config.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = config.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = config.sasl_username
        if config.sasl_password is not None:
            options["sasl_plain_password"] = config.sasl_password.get_secret_value()
    if config.security_protocol.endswith("SSL"):
        options["ssl_check_hostname"] = config.ssl_check_hostname
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(config, key) is not None:
                options[key] = getattr(config, key)
        if config.ssl_key_password is not None:
            options["ssl_password"] = config.ssl_key_password.get_secret_value()
    return options


def _connected(make: Callable[..., Any], config: StreamConfig) -> Any:
    """`make(kafka_client=...)`: a client whose failed connections are recorded, so that a
    bootstrap that times out raises BrokerConnectionError naming the cause. TLS files that
    cannot be used raise TLSSettingsError at once."""
    if config.security_protocol.endswith("SSL"):
        password = config.ssl_key_password
        check_client_tls_files(
            prefix="stream.",
            cafile=config.ssl_cafile,
            certfile=config.ssl_certfile,
            keyfile=config.ssl_keyfile,
            password=password.get_secret_value() if password is not None else None,
        )
    # kafka-python logs a refused TLS connection with a traceback at every retry; the cause is
    # named in one line below, so its records keep their message only (once per process).
    one_line_connection_logs()
    failures = ConnectionFailures()
    try:
        # kafka-python warns ("It is blocking the event loop") about any step of its I/O loop
        # over 0.1 s of wall time, which a loaded machine gives it often. Warn when a stall
        # reaches half the session timeout: then the group membership is at risk.
        slow_step_s = config.session_timeout_ms / 2000
        return make(kafka_client=recording_kafka_client(failures.record, slow_step_s=slow_step_s))
    except KafkaTimeoutError as exc:
        message = describe_connection_failure(
            failures.cause, config, timeout_ms=config.bootstrap_timeout_ms
        )
        raise BrokerConnectionError(message) from exc


def _common_options(config: StreamConfig, client_id: str | None = None) -> dict[str, Any]:
    return {
        "bootstrap_servers": config.bootstrap_servers.split(","),
        "client_id": client_id or config.client_id,
        "request_timeout_ms": config.request_timeout_ms,
        "reconnect_backoff_max_ms": config.reconnect_backoff_max_ms,
        "bootstrap_timeout_ms": config.bootstrap_timeout_ms,
        **security_options(config),
    }


def create_consumer(
    *,
    config: StreamConfig,
    group_id: str | None = None,
    grouped: bool = True,
    client_id: str | None = None,
) -> KafkaConsumer:
    """A consumer with manual commits in `group_id` (default stream.group_id); with `grouped`
    false, in no group at all, so it takes no partitions from the workers and commits nothing (a
    reader beside them, such as the console's alert view: it assigns itself partitions). Raises
    BrokerConnectionError (a KafkaTimeoutError) naming why when no broker lets it in."""
    if not grouped:
        group_id = None
    elif group_id is None:
        group_id = config.group_id
    return _connected(
        lambda **client: KafkaConsumer(
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=config.auto_offset_reset,
            session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=config.heartbeat_interval_ms,
            max_poll_interval_ms=config.max_poll_interval_ms,
            fetch_max_wait_ms=config.fetch_max_wait_ms,
            max_partition_fetch_bytes=config.max_partition_fetch_bytes,
            max_poll_records=config.max_batch_size,
            # Outputs of an open or aborted transaction (exactly_once) are never read; without
            # transactions this reads the same as read_uncommitted.
            isolation_level="read_committed",
            **_common_options(config, client_id),
            **client,
        ),
        config,
    )


def create_producer(*, config: StreamConfig, transactional_id: str | None = None) -> KafkaProducer:
    """The producer of outputs; with `transactional_id`, a transactional one (exactly_once:
    idempotent, acks=all, its transactions time out after transaction_timeout_ms). Without, it
    is not idempotent: kafka-python 3.0's idempotent producer fails every send for good after
    the first record a broker refuses (streams/client_internals.py, IDEMPOTENT_PRODUCER_DIES);
    what idempotence would add, no duplicates from the client's own retries, at-least-once
    does not promise."""
    acks: Any = "all" if config.acks == "all" else int(config.acks)
    delivery: dict[str, Any] = {"enable_idempotence": False}
    if transactional_id:
        acks = "all"
        delivery = {
            "transactional_id": transactional_id,
            "enable_idempotence": True,
            "transaction_timeout_ms": config.transaction_timeout_ms,
        }
    return _connected(
        lambda **client: KafkaProducer(
            acks=acks,
            linger_ms=config.linger_ms,
            batch_size=config.producer_batch_bytes,
            compression_type=None if config.compression_type == "none" else config.compression_type,
            delivery_timeout_ms=config.delivery_timeout_ms,
            max_request_size=config.max_request_size,
            max_block_ms=config.request_timeout_ms,
            **delivery,
            **_common_options(config),
            **client,
        ),
        config,
    )


def connect_with_backoff(
    factory: Callable[[], Any],
    *,
    what: str,
    should_stop: Callable[[], bool],
    on_error: ErrorCallback,
    max_backoff_s: float = 5.0,
    describe: Callable[[BaseException], str] = str,
) -> Any | None:
    """Call `factory` until a broker answers, backing off exponentially; None when told to
    stop first. The worker keeps its readiness false while this waits. `describe` makes the
    logged line of an error (the worker's names the ACL a refusal asks for)."""
    backoff = 0.1
    while not should_stop():
        try:
            return factory()
        except (KafkaError, OSError) as exc:  # BrokerConnectionError: says why
            on_error("broker", exc)
            logger.warning("%s: %s; retrying in %.1f s", what, describe(exc), backoff)
            deadline = time.monotonic() + backoff
            while time.monotonic() < deadline and not should_stop():
                time.sleep(0.05)
            backoff = min(backoff * 2, max_backoff_s)
    return None


def ensure_topics(
    *,
    config: StreamConfig,
    topics: Sequence[str],
    partitions: int = 1,
    configs: dict[str, str] | None = None,
    timeout_s: float = 10.0,
) -> None:
    """Create topics that do not exist yet, with the topic-level `configs` (for the local
    brokers, the demo and tests; production topics are created by their owners), and return
    once the broker's metadata names a leader for each of their partitions: a consumer that
    joins its group before that is assigned nothing (Apache Kafka answers CreateTopics before
    its metadata cache has the topic)."""
    options = {**_common_options(config), "request_timeout_ms": int(timeout_s * 1000)}
    admin = _connected(lambda **client: KafkaAdminClient(**options, **client), config)
    try:
        existing = set(admin.list_topics())
        wanted = [t for t in dict.fromkeys(topics) if t and t not in existing]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(
                    [
                        NewTopic(
                            name=t,
                            num_partitions=partitions,
                            replication_factor=1,
                            topic_configs=dict(configs or {}),
                        )
                        for t in wanted
                    ]
                )
            _wait_for_leaders(admin, wanted, timeout_s=timeout_s)
    finally:
        admin.close()


def topic_access_error(config: StreamConfig, topic: str) -> KafkaError | None:
    """Why this client sees no partitions of `topic`: TopicAuthorizationFailedError (no ACL
    lets it describe the topic), UnknownTopicOrPartitionError, or None when it does see them.
    A consumer's listing of all topics leaves out both alike; a metadata answer for the topic
    alone tells them apart."""
    admin = _connected(
        lambda **client: KafkaAdminClient(**_common_options(config), **client), config
    )
    try:
        (described,) = admin.describe_topics([topic])
    finally:
        admin.close()
    error = for_code(described["error_code"])
    if error is NoError:
        return None
    return (
        TopicAuthorizationFailedError({topic})
        if error is TopicAuthorizationFailedError
        else error(topic)
    )


def _wait_for_leaders(admin: KafkaAdminClient, topics: list[str], *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        waiting = [
            t["name"]
            for t in admin.describe_topics(topics)
            if t["error_code"]
            or not t["partitions"]
            or any(p["error_code"] or p["leader_id"] < 0 for p in t["partitions"])
        ]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"topics {', '.join(waiting)} have no partition leader {timeout_s:g} s after "
                "they were created"
            )
        time.sleep(0.05)
