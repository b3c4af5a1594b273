"""Subcommands worker, broker, produce and demo (owned by the streams work)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from detector import Detector
from detector.bundle import MANIFEST
from streams.brokers.local import ENGINES, BrokerError, create_broker, free_port
from streams.kafka_io import create_producer, ensure_topics
from streams.replay import plan_replay, replay
from streams.worker_process import run_worker_process
from trainer.data import DataError, load_images
from vaewatch.config import Settings
from vaewatch.serve_commands import start_console
from vaewatch.tally import ScoresReader, Tally

logger = logging.getLogger(__name__)

# KafkaTimeoutError: no broker answered at stream.bootstrap_servers (one line, user-fixable).
USER_ERRORS: tuple[type[Exception], ...] = (BrokerError, DataError, KafkaTimeoutError)

DEMO_MODEL = Path("models/demo")


@contextmanager
def stop_on_signals(*, second_exits: bool = False) -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT, so a loop can finish its work and exit cleanly. With
    `second_exits` (the worker), a second signal exits at once (status 128 + signal): what was
    not committed by then is consumed again after a restart, so only the drain is cut short."""
    stop = threading.Event()

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set() and second_exits:
            logger.warning("signal %d again: exiting now, without draining", signum)
            logging.shutdown()
            os._exit(128 + signum)
        logger.info("signal %d: draining and stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- worker ------------------------------------------------------------------------------------


def _quiet_kafka() -> None:
    # kafka-python logs every connection at INFO; keep the worker's own INFO lines readable.
    if logging.getLogger().level >= logging.INFO:
        logging.getLogger("kafka").setLevel(logging.WARNING)


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    _quiet_kafka()
    detector = Detector.from_bundle(args.model, settings.detector)
    shadow_path = args.shadow or settings.lifecycle.shadow_model or None
    shadow = None
    if shadow_path is not None:
        shadow = Detector.from_bundle(shadow_path, settings.detector)
    with stop_on_signals(second_exits=True) as stop:
        return run_worker_process(
            stream=settings.stream,
            metrics_config=settings.metrics,
            detector=detector,
            stop=stop,
            lifecycle_config=settings.lifecycle,
            model_path=args.model,
            shadow=shadow,
        )


# -- broker ------------------------------------------------------------------------------------


def run_broker(args: argparse.Namespace, settings: Settings) -> int:
    _quiet_kafka()
    if args.prepare:
        return _prepare_broker(args.engine)
    broker = create_broker(args.engine, host=args.host, port=args.port)
    with broker, stop_on_signals() as stop:
        stream = settings.stream.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
        topics = [stream.input_topic, stream.alert_topic, stream.dlq_topic, stream.scores_topic]
        ensure_topics(config=stream, topics=topics, partitions=args.partitions)
        print(
            f"{broker.description} on {broker.bootstrap_servers}; topics "
            f"{', '.join(t for t in topics if t)} ({args.partitions} partitions). Ctrl-C stops it.",
            flush=True,
        )
        while not stop.wait(0.5):
            if not broker.running:
                print(f"vaewatch: the broker exited (log: {broker.log_path})", file=sys.stderr)
                return 1
    return 0


def _prepare_broker(engine: str) -> int:
    """Fetch what the engine needs (Kafka's jars into the cache) without starting it."""
    if engine == "kafka":
        from streams.brokers.kafka_jars import find_jars, find_java, kafka_version

        find_java()
        jars = find_jars()
        print(f"Apache Kafka {kafka_version()}: jars in {jars.libs}")
    else:
        from streams.brokers.local import broker_binary

        print(f"Tansu: {broker_binary()}")
    return 0


# -- produce -----------------------------------------------------------------------------------


def _dataset(settings: Settings, dataset: str | None, split: str) -> Any:
    data = settings.data
    if dataset is not None:
        data = data.model_copy(update={"dataset": dataset})
    return data, load_images(data, split=split)


def run_produce(args: argparse.Namespace, settings: Settings) -> int:
    _quiet_kafka()
    data, images = _dataset(settings, args.dataset, args.split)
    stream = settings.stream
    topic = args.topic or stream.input_topic
    if args.partitions:
        ensure_topics(config=stream, topics=[topic], partitions=args.partitions)
    plan = plan_replay(
        labels=images.labels,
        normal_classes=data.normal_classes,
        count=args.count or len(images),
        anomaly_fraction=args.anomaly_fraction,
        seed=args.seed,
        size=len(images),
    )
    producer = create_producer(config=stream)
    started = time.monotonic()
    with stop_on_signals() as stop:
        sent = replay(
            producer=producer,
            topic=topic,
            images=images.images,
            labels=images.labels,
            plan=plan,
            codec=args.codec or stream.codec,
            rate=args.rate,
            split=args.split,
            should_stop=stop.is_set,
        )
    producer.close()
    elapsed = time.monotonic() - started
    print(f"sent {sent} records to {topic} in {elapsed:.1f} s ({sent / max(elapsed, 1e-9):,.0f}/s)")
    return 0


# -- demo --------------------------------------------------------------------------------------


def _demo_model(args: argparse.Namespace, settings: Settings) -> Path:
    model_dir = Path(args.model)
    if (model_dir / MANIFEST).is_file():
        print(f"model: {model_dir} (delete it to train a new one)")
        return model_dir
    from trainer.fit import train_bundle

    epochs = min(settings.train.epochs, args.epochs)
    print(
        f"model: none in {model_dir}; training a quick {settings.model.kind} VAE on "
        f"{settings.data.dataset} classes {list(settings.data.normal_classes)} ({epochs} epochs)"
    )
    started = time.monotonic()
    train_bundle(
        data=settings.data,
        model=settings.model,
        train=settings.train.model_copy(update={"epochs": epochs, "progress": False}),
        calibration=settings.calibration,
        out=model_dir,
    )
    print(f"model: trained in {time.monotonic() - started:.0f} s -> {model_dir}")
    return model_dir


def _dead_letters(registry: CollectorRegistry) -> int:
    """Dead letters the demo's worker has had acknowledged, from its own metrics."""
    return int(
        sum(
            sample.value
            for metric in registry.collect()
            if metric.name == "vaewatch_dead_letters"
            for sample in metric.samples
            if sample.name == "vaewatch_dead_letters_total"
        )
    )


def _summary_line(tally: Tally, sent: int, elapsed: float, dead: int) -> str:
    rate = tally.scored / elapsed if elapsed > 0 else 0.0
    anomaly_rate = tally.flagged / tally.scored if tally.scored else 0.0
    precision = f"{tally.precision:.2f}" if tally.flagged else "-"
    return (
        f"[{elapsed:5.1f}s] sent {sent:6d}  scored {tally.scored:6d} ({rate:6.0f}/s)  "
        f"alerts {tally.flagged:5d} ({anomaly_rate:5.1%})  precision {precision}  "
        f"recall {tally.recall:.2f}  dead letters {dead}"
    )


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    _quiet_kafka()
    data = settings.data
    print(f"data: {data.dataset} test split")
    test = load_images(data, split="test")
    model_dir = _demo_model(args, settings)
    detector = Detector.from_bundle(model_dir, settings.detector)
    metrics_port = args.metrics_port or free_port()
    metrics = settings.metrics.model_copy(update={"host": "127.0.0.1", "port": metrics_port})
    with create_broker(args.engine) as broker:
        stream = settings.stream.model_copy(
            update={
                "bootstrap_servers": broker.bootstrap_servers,
                "scores_topic": settings.stream.scores_topic or "scores",
                "group_id": "vaewatch-demo",
            }
        )
        topics = [stream.input_topic, stream.alert_topic, stream.scores_topic, stream.dlq_topic]
        ensure_topics(config=stream, topics=topics, partitions=2)
        print(f"broker: {broker.description} on {broker.bootstrap_servers}")
        stop_worker = threading.Event()
        outcome: list[int] = []
        registry = CollectorRegistry()
        worker = threading.Thread(
            target=lambda: outcome.append(
                run_worker_process(
                    stream=stream,
                    metrics_config=metrics,
                    detector=detector,
                    stop=stop_worker,
                    registry=registry,
                )
            ),
            name="worker",
        )
        worker.start()
        print(
            f"worker: model {detector.version} on {detector.device}; metrics, /healthz, "
            f"/readyz at http://127.0.0.1:{metrics_port}/metrics"
        )
        console = start_console(model_dir, settings, stream=stream, port=args.console_port)
        print(f"console: {console.url}/ (live alerts, score, generate; API docs at /docs)")
        plan = plan_replay(
            labels=test.labels,
            normal_classes=data.normal_classes,
            count=args.count,
            anomaly_fraction=args.anomaly_fraction,
            seed=0,
        )
        print(
            f"replay: {args.count} test images at {args.rate:.0f}/s, {args.anomaly_fraction:.0%} "
            f"anomalies (classes other than {list(data.normal_classes)}), plus 3 malformed records"
        )
        producer = create_producer(config=stream)
        # Three records the worker cannot use, to show the dead-letter topic at work.
        for bad in (b"too short", b"\x00" * 785, b""):
            producer.send(stream.input_topic, value=bad, headers=[("id", b"malformed")])
        reader = ScoresReader(config=stream, topic=stream.scores_topic)
        started = time.monotonic()
        sent = [0]
        last_print = [0.0]

        def progress(count: int) -> None:
            sent[0] = count
            tally = reader.poll(timeout_ms=0)
            now = time.monotonic()
            if now - last_print[0] >= 1.0:
                last_print[0] = now
                print(
                    _summary_line(tally, count, now - started, _dead_letters(registry)),
                    flush=True,
                )

        with stop_on_signals() as interrupted:
            replay(
                producer=producer,
                topic=stream.input_topic,
                images=test.images,
                labels=test.labels,
                plan=plan,
                codec=stream.codec,
                rate=args.rate,
                should_stop=interrupted.is_set,
                on_progress=progress,
            )
            deadline = time.monotonic() + 60
            while reader.tally.scored < sent[0] and time.monotonic() < deadline:
                if interrupted.is_set():
                    break
                progress(sent[0])
                reader.poll(timeout_ms=200)
        tally = reader.tally
        stop_worker.set()
        worker.join()
        console.stop()
        print(_summary_line(tally, sent[0], time.monotonic() - started, _dead_letters(registry)))
        reader.close()
        producer.close()
    complete = tally.scored >= sent[0]
    print(
        f"done: {tally.scored} of {sent[0]} records scored"
        f"{'' if complete else ' (incomplete)'}, {tally.flagged} alerts, precision "
        f"{tally.precision:.2f}, recall {tally.recall:.2f} against the labels; worker exit "
        f"code {outcome[0] if outcome else '?'}; broker stopped"
    )
    return 0 if complete and outcome == [0] else 1


# -- registration ------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser(
        "worker",
        help="score images from Kafka, publish alerts, serve metrics",
        description="Consume stream.input_topic, score micro-batches with the model, publish "
        "alerts (and scores), dead-letter malformed records, commit after acknowledgement. "
        "SIGTERM/SIGINT drain and exit 0.",
    )
    worker.add_argument(
        "--model",
        required=True,
        type=Path,
        help="model bundle directory, or a symlink to one: watched, a new bundle there is "
        "loaded in the background and swapped in between batches (docs/lifecycle.md)",
    )
    worker.add_argument(
        "--shadow",
        type=Path,
        default=None,
        help="candidate bundle that scores every batch too, without affecting alerts or "
        "commits (default: lifecycle.shadow_model)",
    )
    worker.set_defaults(run=run_worker)

    broker = subparsers.add_parser(
        "broker",
        help="run a local broker: Tansu (in memory) or Apache Kafka",
        description="Start a local broker, create the stream topics, print the bootstrap "
        "address and run until SIGTERM/SIGINT.",
    )
    _engine_option(broker)
    broker.add_argument("--host", default="127.0.0.1")
    broker.add_argument("--port", type=int, default=9092)
    broker.add_argument(
        "--partitions", type=int, default=1, help="partitions of the stream topics it creates"
    )
    broker.add_argument(
        "--prepare",
        action="store_true",
        help="only fetch what the engine needs (Kafka: its jars, into the user's cache) and exit",
    )
    broker.set_defaults(run=run_broker)

    produce = subparsers.add_parser(
        "produce", help="replay a labelled dataset into a topic at a steady rate"
    )
    produce.add_argument("--topic", default=None, help="default: stream.input_topic")
    produce.add_argument("--dataset", default=None, help="default: data.dataset")
    produce.add_argument("--split", default="test", choices=["train", "test"])
    produce.add_argument("--rate", type=float, default=0.0, help="records/s (0 = unthrottled)")
    produce.add_argument("--count", type=int, default=0, help="records (0 = the split once)")
    produce.add_argument("--codec", default=None, choices=["raw", "json"])
    produce.add_argument(
        "--anomaly-fraction",
        type=float,
        default=None,
        help="draw records so that this share are anomalies (default: dataset order)",
    )
    produce.add_argument(
        "--partitions", type=int, default=0, help="create the topic with N partitions if missing"
    )
    produce.add_argument("--seed", type=int, default=0)
    produce.set_defaults(run=run_produce)

    demo = subparsers.add_parser(
        "demo", help="train if needed, start a broker and a worker, replay, summarise"
    )
    _engine_option(demo)
    demo.add_argument("--model", default=str(DEMO_MODEL), help=f"default: {DEMO_MODEL}")
    demo.add_argument("--epochs", type=int, default=8, help="epochs of the quick training")
    demo.add_argument("--count", type=int, default=10000)
    demo.add_argument("--rate", type=float, default=1000.0)
    demo.add_argument("--anomaly-fraction", type=float, default=0.1)
    demo.add_argument("--metrics-port", type=int, default=0, help="default: a free port")
    demo.add_argument("--console-port", type=int, default=0, help="default: a free port")
    demo.set_defaults(run=run_demo)


def _engine_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="tansu",
        help="tansu: embedded, in memory, starts in milliseconds (default); kafka: Apache Kafka "
        "(KRaft, one node; Java 17+, jars from KAFKA_HOME or fetched with Maven once)",
    )
