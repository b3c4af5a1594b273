"""Runs one worker process: metrics server, Kafka clients (with retries), the loop, shutdown."""

from __future__ import annotations

import contextlib
import logging
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from detector import Detector
from detector.preprocess import ImageDecoding, ImageSettings
from streams.client_internals import force_close_producer
from streams.config import MetricsConfig, StreamConfig
from streams.connection_errors import describe_kafka_error
from streams.kafka_io import connect_with_backoff, create_consumer, create_producer
from streams.lifecycle.config import LifecycleConfig
from streams.lifecycle.metrics import LifecycleMetrics
from streams.lifecycle.model_lifecycle import build_lifecycle, reload_on_sighup
from streams.tls import server_tls_context
from streams.worker.health import MetricsServer
from streams.worker.loop import Worker, WorkerState
from streams.worker.metrics import WorkerMetrics, score_buckets
from streams.worker.publish import ResultPublisher
from streams.worker.scoring import Scorer, build_scorer
from streams.worker.transactions import TransactionalProducer, start_transactions

logger = logging.getLogger(__name__)


def build_metrics(*, detector: Detector, registry: CollectorRegistry) -> WorkerMetrics:
    metrics = WorkerMetrics(
        registry=registry,
        score_buckets=score_buckets(detector.calibration.scores, threshold=detector.threshold),
    )
    metrics.serving(detector)
    return metrics


def metrics_tls(config: MetricsConfig) -> ssl.SSLContext | None:
    """The metrics endpoint's TLS context, or None for plain HTTP; TLSSettingsError (one
    line) when its files cannot be used."""
    if not config.tls_cert_file:
        return None
    return server_tls_context(
        setting="metrics.tls_cert_file",
        certfile=config.tls_cert_file,
        keyfile=config.tls_key_file,
        client_cafile=config.tls_client_ca_file,
        client_auth="required" if config.tls_client_ca_file else "none",
    )


def metrics_basic_auth(config: MetricsConfig) -> tuple[str, str] | None:
    if config.basic_auth_username is None or config.basic_auth_password is None:
        return None
    return config.basic_auth_username, config.basic_auth_password.get_secret_value()


def tune_interpreter(stream: StreamConfig, *, detector: Detector) -> None:
    """torch's CPU threads and the GIL switch interval of the worker's process. The shorter
    switch interval only pays where torch runs in this process (inline scoring, CUDA
    launches): each torch op releases the GIL and must win it back from kafka-python's I/O
    thread. With a scoring process it only adds switches between the main and I/O threads, so
    Python's default interval stays (the backlog drain in BENCHMARKS.md compares both)."""
    if stream.cpu_threads and detector.device.type == "cpu":
        torch.set_num_threads(stream.cpu_threads)
    scores_here = detector.device.type == "cuda" or stream.cpu_scoring != "process"
    if scores_here and stream.gil_switch_interval_ms:
        sys.setswitchinterval(stream.gil_switch_interval_ms / 1000.0)


def scorer_for(stream: StreamConfig, *, detector: Detector, metrics: WorkerMetrics) -> Scorer:
    """The worker's scorer (streams.worker.scoring.build_scorer), its restarts counted as errors."""
    return build_scorer(stream, detector=detector, on_error=metrics.count_error)


def publisher_for(
    stream: StreamConfig,
    *,
    detector: Detector,
    producer: Any,
    clock: Callable[[], float] = time.time,
) -> ResultPublisher:
    """The publisher of `detector`'s outputs; `clock` stamps them (tests give their own)."""
    return ResultPublisher(
        producer=producer,
        alert_topic=stream.alert_topic,
        scores_topic=stream.scores_topic,
        dlq_topic=stream.dlq_topic,
        model_version=detector.version,
        threshold=detector.threshold,
        scores_format=stream.scores_format,
        alert_format=stream.alert_format,
        max_request_size=stream.max_request_size,
        clock=clock,
    )


def run_worker_process(
    *,
    stream: StreamConfig,
    metrics_config: MetricsConfig,
    detector: Detector,
    stop: threading.Event,
    registry: CollectorRegistry | None = None,
    lifecycle_config: LifecycleConfig | None = None,
    model_path: str | Path | None = None,
    shadow: Detector | None = None,
    images: ImageSettings | None = None,
) -> int:
    """Run until `stop` is set; 0 when every consumed record was committed on the way out,
    1 when some were not (they are re-delivered to the next worker: nothing is lost).
    `model_path` is watched for new bundles and `shadow` scores beside the serving model
    (docs/lifecycle.md). With the image codec, records are decoded by the serving bundle's
    preprocessing within the limits and threads of `images` (the settings' images section)."""
    registry = registry if registry is not None else CollectorRegistry()
    tls = metrics_tls(metrics_config)  # a file it cannot use fails before anything starts
    tune_interpreter(stream, detector=detector)
    metrics = build_metrics(detector=detector, registry=registry)
    # Started before the Kafka clients: the scoring process loads the model meanwhile.
    scorer = scorer_for(stream, detector=detector, metrics=metrics)
    state = WorkerState(model_loaded=scorer.ready, liveness_timeout_s=stream.liveness_timeout_s)
    lifecycle_config = lifecycle_config or LifecycleConfig()
    lifecycle = build_lifecycle(
        config=lifecycle_config,
        detector=detector,
        metrics=metrics,
        lifecycle_metrics=LifecycleMetrics(registry=registry),
        model_path=model_path,
        shadow=shadow,
        make_scorer=lambda new: scorer_for(stream, detector=new, metrics=metrics),
        on_error=metrics.count_error,
    )
    restore_sighup = reload_on_sighup(lifecycle)

    # Evaluated on every scrape, so the gauge follows the worker without a /readyz probe.
    metrics.ready.set_function(lambda: 1.0 if state.readiness()[0] else 0.0)
    server = MetricsServer(
        host=metrics_config.host,
        port=metrics_config.port,
        registry=registry,
        readiness=state.readiness,
        liveness=state.liveness,
        admin=lifecycle.admin if lifecycle_config.admin_reload else None,
        tls=tls,
        basic_auth=metrics_basic_auth(metrics_config),
    ).start()

    def connect(factory: Callable[[], Any], what: str) -> Any:
        return connect_with_backoff(
            factory,
            what=what,
            should_stop=stop.is_set,
            on_error=metrics.count_error,
            max_backoff_s=stream.reconnect_backoff_max_ms / 1000.0,
            describe=lambda exc: describe_kafka_error(exc, stream),
        )

    consumer = producer = side_producer = None
    worker: Worker | None = None
    exactly_once = stream.processing_guarantee == "exactly_once"
    try:
        producer = connect(
            (lambda: TransactionalProducer(stream))
            if exactly_once
            else (lambda: create_producer(config=stream)),
            "producer",
        )
        # The shadow's comparisons are sent outside the transactions.
        side_producer = (
            connect(lambda: create_producer(config=stream), "producer")
            if exactly_once
            else producer
        )
        consumer = connect(lambda: create_consumer(config=stream), "consumer")
        if consumer is None or producer is None or side_producer is None:
            return 0  # stopped before a broker answered: nothing was consumed
        transactions = None
        if exactly_once:
            transactions = start_transactions(
                producer=producer, consumer=consumer, config=stream, metrics=metrics
            )
        state.broker_connected = True
        lifecycle.attach_producer(
            side_producer,
            make_publisher=lambda new: publisher_for(stream, detector=new, producer=producer),
        )
        worker = Worker(
            config=stream,
            scorer=scorer,
            publisher=publisher_for(stream, detector=detector, producer=producer),
            metrics=metrics,
            consumer=consumer,
            producer=producer,
            state=state,
            lifecycle=lifecycle,
            transactions=transactions,
            images=image_decoding(stream, images, detector=detector, shadow=shadow),
        )
        logger.info(
            "worker: %s -> alerts %s, scores %s, dlq %s (group %s, model %s on %s, %s, %s)",
            stream.input_topic,
            stream.alert_topic,
            stream.scores_topic or "(off)",
            stream.dlq_topic,
            stream.group_id,
            detector.version,
            detector.device,
            f"scoring {scorer.description}",
            "exactly-once, transactional id " + producer.transactional_id
            if exactly_once
            else "at-least-once",
        )
        complete = worker.run(stop)
        return 0 if complete else 1
    finally:
        state.group_joined = False
        restore_sighup()
        lifecycle.close()
        deadline = getattr(worker, "shutdown_deadline", None)
        close_clients(
            consumer=consumer,
            producer=producer,
            deadline=deadline or time.monotonic() + stream.drain_timeout_s,
        )
        if side_producer is not None and side_producer is not producer:
            close_clients(consumer=None, producer=side_producer, deadline=time.monotonic() + 1.0)
        if deadline is not None:
            took = time.monotonic() - (deadline - stream.drain_timeout_s)
            logger.info(
                "shutdown: drained and closed the clients in %.2f s (drain_timeout_s %g)",
                took,
                stream.drain_timeout_s,
            )
        (worker.scorer if worker is not None else scorer).close()
        server.stop()
        logger.info("worker stopped")


def image_decoding(
    stream: StreamConfig,
    images: ImageSettings | None,
    *,
    detector: Detector,
    shadow: Detector | None = None,
) -> ImageDecoding | None:
    """How the image codec makes records the model's input; None for the other codecs."""
    if stream.codec != "image":
        return None
    if shadow is not None and shadow.preprocessing != detector.preprocessing:
        logger.warning(
            "the shadow bundle %s preprocesses images unlike the serving bundle %s; it is shown "
            "the serving bundle's preprocessing of each record",
            shadow.version, detector.version,
        )  # fmt: skip
    return (images or ImageSettings()).decoding(detector.preprocessing)


def close_clients(*, consumer: Any, producer: Any, deadline: float) -> None:
    """Close the Kafka clients by the time.monotonic() `deadline` (what is left of the
    shutdown). Leaving the group runs the revoke listener, which keeps to the same deadline.
    Neither close may raise: a producer whose sends are still outstanding when time is up is
    closed by force (they were not committed, so their records are consumed again)."""

    def left() -> float:
        return max(0.0, deadline - time.monotonic())

    if consumer is not None:
        try:
            consumer.close(autocommit=False, timeout_ms=int(left() * 1000))
        except KafkaError as exc:
            logger.warning("closing the consumer: %s", exc)
    if producer is not None:
        try:
            producer.close(timeout=left())
        except KafkaError as exc:  # its flush() timed out: stop the sender without waiting
            logger.warning("closing the producer: %s; closing it by force", exc)
            with contextlib.suppress(KafkaError):
                force_close_producer(producer)
