"""Subcommands worker, broker, produce and demo (owned by the streams work).

kafka-python and the worker are imported by the commands that run them, not with this module:
every command's CLI imports it, and `vaewatch score` or `vaewatch config` should not pay about
0.3 s for a Kafka client they never make (tests/vaewatch/test_cli_imports.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from detector import Detector
from detector.preprocess import IMAGE_SUFFIXES
from streams.brokers.local import ENGINES, BrokerError, create_broker
from streams.signals import stop_on_signals
from trainer.data import DataError, load_images, normal_labels
from trainer.demo import FASHION_MNIST_CLASSES, demo_bundle
from trainer.evaluate import auroc
from trainer.image_folder import list_files
from vaewatch.config import Settings
from vaewatch.serve_commands import start_console

logger = logging.getLogger(__name__)


def user_errors() -> tuple[type[Exception], ...]:
    """The errors these commands end with in one line. KafkaTimeoutError: no broker answered at
    stream.bootstrap_servers. Imported only when an error is on its way (see the docstring)."""
    from kafka.errors import KafkaTimeoutError

    from streams.worker.transactions import TransactionsUnavailableError

    return (BrokerError, DataError, KafkaTimeoutError, TransactionsUnavailableError)


DEMO_MODEL = Path("models/demo")


# -- worker ------------------------------------------------------------------------------------


def _quiet_kafka() -> None:
    # kafka-python logs every connection at INFO; keep the worker's own INFO lines readable.
    if logging.getLogger().level >= logging.INFO:
        logging.getLogger("kafka").setLevel(logging.WARNING)


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.worker_process import run_worker_process

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
            images=settings.images,
        )


# -- broker ------------------------------------------------------------------------------------


def run_broker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.kafka_io import ensure_topics

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


def _dataset_records(args: argparse.Namespace, settings: Settings) -> tuple[Any, Any]:
    """(records, their normal labels): a data set's images, encoded by the codec."""
    from streams.replay import ArrayRecords

    data = settings.data
    if args.dataset is not None:
        data = data.model_copy(update={"dataset": args.dataset})
    if data.dataset.startswith("folder:"):
        raise DataError(
            f"--dataset {data.dataset}: send a folder's files as they are with --from DIR"
        )
    images = load_images(data, split=args.split)
    codec = args.codec or settings.stream.codec
    records = ArrayRecords(images.images, images.labels, codec=codec, split=args.split)
    return records, normal_labels(data.normal_classes, images.classes)


def _folder_records(args: argparse.Namespace, settings: Settings) -> tuple[Any, Any]:
    """(records, their normal labels): a folder's image files as they are; files too large for
    one request are left out, one line each."""
    from streams.replay import FileRecords

    folder = args.from_dir
    if not folder.is_dir():
        raise DataError(f"--from {folder}: not a folder")
    listing = list_files(folder)
    limit = settings.stream.max_request_size - 1024  # room for the key, headers and framing
    fits = np.asarray([f.stat().st_size <= limit for f in listing.files], dtype=bool)
    for file in (f for f, ok in zip(listing.files, fits, strict=True) if not ok):
        logger.warning("%s: over stream.max_request_size (%d bytes); not sent", file, limit)
    files = [f for f, ok in zip(listing.files, fits, strict=True) if ok]
    if not files:
        raise DataError(f"--from {folder}: no image files to send ({', '.join(IMAGE_SUFFIXES)})")
    labels = listing.labels[fits] if listing.labels is not None else None
    records = FileRecords(folder, files, labels, listing.classes)
    if labels is None:
        return records, None
    try:
        return records, normal_labels(settings.data.normal_classes, listing.classes)
    except DataError as exc:
        if args.anomaly_fraction is not None:
            raise
        logger.warning("%s; records go without the anomaly header", exc)
        return records, None


def run_produce(args: argparse.Namespace, settings: Settings) -> int:
    from streams.replay import replay_to_topic

    _quiet_kafka()
    if args.from_dir is not None:
        records, normal = _folder_records(args, settings)
    else:
        records, normal = _dataset_records(args, settings)
    stream = settings.stream
    topic = args.topic or stream.input_topic
    sent, elapsed = replay_to_topic(
        config=stream,
        topic=topic,
        records=records,
        normal_classes=normal,
        count=args.count or len(records),
        anomaly_fraction=args.anomaly_fraction,
        seed=args.seed,
        rate=args.rate,
        partitions=args.partitions,
    )
    print(f"sent {sent} records to {topic} in {elapsed:.1f} s ({sent / max(elapsed, 1e-9):,.0f}/s)")
    return 0


# -- demo --------------------------------------------------------------------------------------


def _say(line: str) -> None:
    print(line, flush=True)


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from streams import demo

    _quiet_kafka()
    data = settings.data
    _say(f"data: {data.dataset} test split")
    test = load_images(data, split="test")
    model_dir, normal_classes = demo_bundle(
        Path(args.model),
        data=data,
        model=settings.model,
        train=settings.train,
        calibration=settings.calibration,
        epochs=args.epochs,
        say=_say,
        image_settings=settings.images,
    )
    _quiet_pipeline()
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
        normal_classes=normal_labels(normal_classes, test.classes),
        detector=Detector.from_bundle(model_dir, settings.detector),
        stream=settings.stream,
        metrics=settings.metrics,
        start_console=lambda stream, port: start_console(
            model_dir, settings, stream=stream, port=port
        ),
        say=_say,
        image_settings=settings.images,
        class_names=FASHION_MNIST_CLASSES if data.dataset == "fashion-mnist" else None,
        auroc=auroc,
    )


def _quiet_pipeline() -> None:
    """The demo says what happens in its own lines; the worker's and the console's INFO lines
    (partitions assigned, bursts of alerts not shown) would bury them. Their warnings and
    errors still show, and --log-level DEBUG shows everything."""
    if logging.getLogger().level == logging.INFO:
        for name in ("streams", "serve"):
            logging.getLogger(name).setLevel(logging.WARNING)


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
        "produce",
        help="replay a labelled dataset, or a folder's image files, into a topic at a steady rate",
        description="Send a data set's images encoded by the codec, or with --from DIR every "
        "image file under DIR as it is (for stream.codec image): headers id (the file's path in "
        "DIR), label (its class folder) and anomaly (whether that class is not one of "
        "data.normal_classes).",
    )
    produce.add_argument("--topic", default=None, help="default: stream.input_topic")
    produce.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        default=None,
        help="send the image files under this folder (class subfolders give the labels)",
    )
    produce.add_argument("--dataset", default=None, help="default: data.dataset")
    produce.add_argument("--split", default="test", choices=["train", "test"])
    produce.add_argument("--rate", type=float, default=0.0, help="records/s (0 = unthrottled)")
    produce.add_argument("--count", type=int, default=0, help="records (0 = each once)")
    produce.add_argument(
        "--codec",
        default=None,
        choices=["raw", "json", "image"],
        help="how a data set's images are encoded (default: stream.codec; image: 28x28 PNGs)",
    )
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
