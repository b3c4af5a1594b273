"""Subcommands worker, broker, produce and demo (owned by the streams work)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from kafka.errors import KafkaTimeoutError

from detector import Detector
from streams import demo
from streams.brokers.local import ENGINES, BrokerError, create_broker
from streams.kafka_io import ensure_topics
from streams.replay import replay_to_topic
from streams.signals import stop_on_signals
from streams.worker.transactions import TransactionsUnavailableError
from streams.worker_process import run_worker_process
from trainer.data import DataError, load_images
from trainer.demo import demo_bundle
from vaewatch.config import Settings
from vaewatch.serve_commands import start_console

logger = logging.getLogger(__name__)

# KafkaTimeoutError: no broker answered at stream.bootstrap_servers (one line, user-fixable).
USER_ERRORS: tuple[type[Exception], ...] = (
    BrokerError,
    DataError,
    KafkaTimeoutError,
    TransactionsUnavailableError,
)

DEMO_MODEL = Path("models/demo")


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
    sent, elapsed = replay_to_topic(
        config=stream,
        topic=topic,
        images=images.images,
        labels=images.labels,
        normal_classes=data.normal_classes,
        count=args.count or len(images),
        anomaly_fraction=args.anomaly_fraction,
        seed=args.seed,
        codec=args.codec or stream.codec,
        rate=args.rate,
        split=args.split,
        partitions=args.partitions,
    )
    print(f"sent {sent} records to {topic} in {elapsed:.1f} s ({sent / max(elapsed, 1e-9):,.0f}/s)")
    return 0


# -- demo --------------------------------------------------------------------------------------


def _say(line: str) -> None:
    print(line, flush=True)


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    _quiet_kafka()
    data = settings.data
    _say(f"data: {data.dataset} test split")
    test = load_images(data, split="test")
    model_dir = demo_bundle(
        Path(args.model),
        data=data,
        model=settings.model,
        train=settings.train,
        calibration=settings.calibration,
        epochs=args.epochs,
        say=_say,
    )
    return demo.run_demo(
        demo.DemoRun(
            engine=args.engine,
            count=args.count,
            rate=args.rate,
            anomaly_fraction=args.anomaly_fraction,
            metrics_port=args.metrics_port,
            console_port=args.console_port,
        ),
        images=test.images,
        labels=test.labels,
        normal_classes=data.normal_classes,
        detector=Detector.from_bundle(model_dir, settings.detector),
        stream=settings.stream,
        metrics=settings.metrics,
        start_console=lambda stream, port: start_console(
            model_dir, settings, stream=stream, port=port
        ),
        say=_say,
    )


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
