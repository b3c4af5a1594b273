"""Backlog drain: how fast the worker empties a 50,000-record backlog, end to end (consume,
decode, score, produce scores and alerts, wait for acks, commit), against a plain kafka-python
consume of the same topic measured in the same run on the same broker.

    .venv/bin/python bench/worker_throughput.py --model-kind mlp [--records 50000] [--profile]
    .venv/bin/python bench/worker_throughput.py --engine both --repeats 3 --no-scores-topic

--engine picks the broker (bench/brokers.py): the embedded Tansu (default), a real Apache Kafka,
or both alternating in one invocation, each run on a fresh broker; with more than one run a
side-by-side table (medians, ratio kafka / tansu) follows the runs' summaries.

Without --model, the bench builds an untrained VAE of the given kind with a calibration from real
Fashion-MNIST images: the scoring cost depends on the architecture, not on the weights.
Records are the real Fashion-MNIST test images, cycled, raw codec, one input partition.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from brokers import (
    FETCH_MAX_WAIT_MS,
    add_engine_options,
    broker_cpu_s,
    process_cpu_s,
    run_order,
    side_by_side,
    started_broker,
)
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from detector import VAE, Calibration, Detector, ModelConfig, save_bundle
from detector.config import DetectorSettings
from streams.brokers.local import Broker
from streams.codec import encode_images
from streams.config import StreamConfig
from streams.kafka_io import create_consumer, create_producer, ensure_topics
from streams.worker.loop import Worker, WorkerState
from streams.worker.transactions import start_transactions
from streams.worker_process import build_metrics, publisher_for, scorer_for, tune_interpreter
from trainer.data import read_idx

FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def fashion_images(path: Path = FASHION_TEST, classes: list[int] | None = None) -> np.ndarray:
    """The test images, in file order; only those of `classes` (their labels file beside
    them) when given."""
    images = read_idx(path).reshape(-1, 784)
    if classes:
        labels = read_idx(path.with_name(path.name.replace("images-idx3", "labels-idx1")))
        images = images[np.isin(labels, classes)]
    return np.ascontiguousarray(images)


def make_bundle(kind: str, folder: Path, images: np.ndarray) -> Path:
    torch.manual_seed(0)
    model = VAE(ModelConfig(kind=kind))
    scratch = Calibration(threshold=0.0, target_fpr=0.01, method="conformal", scores=np.zeros(1))
    scores = Detector(model, scratch, version="x", device="cpu").score(images[:2000]).scores
    threshold = float(np.quantile(scores, 0.9))  # ~10% alerts: a realistic alert volume
    calibration = Calibration(
        threshold=threshold, target_fpr=0.1, method="conformal", scores=scores
    )
    save_bundle(folder, model=model, calibration=calibration)
    return folder


def fill_topic(bootstrap: str, topic: str, images: np.ndarray, n: int) -> None:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, batch_size=1 << 20
    )
    values = encode_images(images, codec="raw")
    for i in range(n):
        producer.send(topic, value=values[i % len(values)], partition=0)
    producer.flush()
    producer.close()


def plain_consume(bootstrap: str, topic: str, n: int, max_records: int) -> float:
    """Records/s of a bare kafka-python consumer, first to last record."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    consumer.assign([TopicPartition(topic, 0)])
    total, first, first_size = 0, None, 0
    while total < n:
        for records in consumer.poll(timeout_ms=1000, max_records=max_records).values():
            if first is None:  # the rate runs from the end of the first poll
                first, first_size = time.perf_counter(), len(records)
            total += len(records)
    elapsed = time.perf_counter() - first
    consumer.close()
    return (total - first_size) / elapsed


STAGES = {
    "_poll": "poll (fetch + unpack records)",
    "_start_batch": "decode + score, or hand to the scorer (+ batch bookkeeping)",
    "publish_oldest": "publish (wait for scores, build JSON, producer.send)",
    "_service": "acks, commit, lag",
}


def time_stages(worker: Worker) -> dict[str, float]:
    """Wrap the stage methods of the worker and of its batches' owner with wall-clock timers
    (main thread only)."""
    totals = dict.fromkeys(STAGES, 0.0)
    for name in STAGES:
        owner = worker if hasattr(worker, name) else worker._delivery
        original = getattr(owner, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_name] += time.perf_counter() - started

        setattr(owner, name, timed)
    return totals


def worker_drain(
    config: StreamConfig, detector: Detector, n: int, profile: bool, broker: Broker
) -> dict:
    registry = CollectorRegistry()
    metrics = build_metrics(detector=detector, registry=registry)
    scorer = scorer_for(config, detector=detector, metrics=metrics)
    state = WorkerState(model_loaded=scorer.ready)
    exactly_once = config.processing_guarantee == "exactly_once"
    producer = create_producer(
        config=config, transactional_id="bench-drain" if exactly_once else None
    )
    consumer = create_consumer(config=config)
    transactions = None
    if exactly_once:
        transactions = start_transactions(
            producer=producer, consumer=consumer, config=config, metrics=metrics
        )
    worker = Worker(
        config=config,
        scorer=scorer,
        publisher=publisher_for(config, detector=detector, producer=producer),
        metrics=metrics,
        consumer=consumer,
        producer=producer,
        state=state,
        transactions=transactions,
    )
    stop = threading.Event()
    marks: dict[str, float] = {}
    scored = [0]

    process = getattr(scorer, "process", None)
    child_pid = process._process.pid if process is not None else None

    def child_cpu_s() -> float:
        return process_cpu_s(child_pid) if child_pid else 0.0

    def on_batch(size: int) -> None:
        if not scored[0]:
            marks["first"] = time.perf_counter()
            marks["cpu_first"] = time.process_time()
            marks["child_cpu_first"] = child_cpu_s()
            marks["broker_cpu_first"] = broker_cpu_s(broker)
            marks["first_size"] = size
            for key in stage_s:  # the group join before the first batch is not a stage cost
                stage_s[key] = 0.0
        scored[0] += size
        if scored[0] >= n and "last" not in marks:
            marks["last"] = time.perf_counter()

    def acked(outcome: str | None = None) -> float:
        return sum(
            s.value
            for m in registry.collect()
            if m.name == "vaewatch_records"
            for s in m.samples
            if s.name == "vaewatch_records_total" and outcome in (None, s.labels["outcome"])
        )

    worker.on_batch_scored = on_batch
    stage_s = time_stages(worker)
    profiler = cProfile.Profile() if profile else None

    def run() -> None:
        if profiler:
            profiler.enable()
        worker.run(stop)
        if profiler:
            profiler.disable()

    thread = threading.Thread(target=run)
    thread.start()
    while acked() < n:
        time.sleep(0.01)
    # exactly_once: the outputs count once their transaction is committed
    while transactions is not None and transactions.open:
        time.sleep(0.001)
    marks["acked"] = time.perf_counter()
    marks["cpu_acked"] = time.process_time()
    marks["child_cpu_acked"] = child_cpu_s()
    marks["broker_cpu_acked"] = broker_cpu_s(broker)
    stop.set()
    thread.join()
    worker._consumer.close()
    producer.close()
    scorer.close()
    inference = next(m for m in registry.collect() if m.name == "vaewatch_batch_inference_seconds")
    infer_sum = next(s.value for s in inference.samples if s.name.endswith("_sum"))
    batches = next(s.value for s in inference.samples if s.name.endswith("_count"))
    scored_n = n - marks["first_size"]
    result = {
        "scored_per_s": scored_n / (marks["last"] - marks["first"]),
        "acked_per_s": scored_n / (marks["acked"] - marks["first"]),
        "inference_s": infer_sum,
        "batches": batches,
        "wall_s": marks["acked"] - marks["first"],
        "alert_share": acked("anomaly") / max(acked(), 1),
        # CPU seconds over the same span: this process (worker threads, kafka-python's I/O
        # threads, torch when it scores here), the scoring process, and the broker; 2 cores
        # give at most 2 CPU seconds per second.
        "cpu_s": {
            "worker_process": round(marks["cpu_acked"] - marks["cpu_first"], 3),
            "scoring_process": round(marks["child_cpu_acked"] - marks["child_cpu_first"], 3),
            "broker": round(marks["broker_cpu_acked"] - marks["broker_cpu_first"], 3),
        },
    }
    # The stages run one after the other in the worker's thread, never nested: the sums do not
    # overlap. Inline scoring is counted in "decode + score"; waiting for a scoring process or
    # thread in "publish".
    result["stages_s"] = {STAGES[k]: round(v, 3) for k, v in stage_s.items()}
    if profiler:
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
        stats.print_stats(25)
        result["profile"] = out.getvalue()
    return result


def drain_run(
    args: argparse.Namespace, engine: str, detector: Detector, images: np.ndarray, label: str
) -> dict:
    """One measurement on a fresh broker of `engine`: its summary."""
    fetch_wait_ms = args.fetch_max_wait_ms
    if fetch_wait_ms is None:
        fetch_wait_ms = FETCH_MAX_WAIT_MS[engine]
    detail = f", stream.fetch_max_wait_ms {fetch_wait_ms}"
    with started_broker(engine, label=label, detail=detail) as broker:
        config = StreamConfig(
            bootstrap_servers=broker.bootstrap_servers,
            input_topic="bench.images",
            alert_topic="bench.alerts",
            scores_topic="" if args.no_scores_topic else "bench.scores",
            dlq_topic="bench.dlq",
            group_id="bench",
            max_batch_size=args.batch,
            cpu_scoring=args.cpu_scoring,
            cpu_threads=args.torch_threads,
            scores_format=args.scores_format,
            alert_format=args.alert_format,
            fetch_max_wait_ms=fetch_wait_ms,
            processing_guarantee=args.guarantee,
            transaction_interval_ms=args.transaction_interval_ms,
        )
        tune_interpreter(config, detector=detector)  # as the worker does (threads, GIL)
        if args.switch_interval:
            sys.setswitchinterval(args.switch_interval)
        ensure_topics(
            config=config,
            topics=["bench.images", "bench.alerts", "bench.scores", "bench.dlq"],
        )
        fill_topic(broker.bootstrap_servers, "bench.images", images, args.records)
        batch = np.resize(images, (args.records, 784))
        started = time.perf_counter()
        for i in range(0, args.records, args.batch):
            detector.score(batch[i : i + args.batch])
        scoring_alone = args.records / (time.perf_counter() - started)
        baseline = plain_consume(broker.bootstrap_servers, "bench.images", args.records, 1024)
        result = worker_drain(config, detector, args.records, args.profile, broker)
        baseline_after = plain_consume(broker.bootstrap_servers, "bench.images", args.records, 1024)
        description = broker.description
    plain = (baseline + baseline_after) / 2
    summary = {
        "broker": description,
        "fetch_max_wait_ms": fetch_wait_ms,
        "model": str(args.model or f"untrained {args.model_kind}"),
        "device": str(detector.device),
        "precision": detector.precision,
        "torch_threads": torch.get_num_threads(),
        "records": args.records,
        "max_batch_size": args.batch,
        "scores_topic": not args.no_scores_topic,
        "scores_format": args.scores_format,
        "alert_format": args.alert_format,
        "cpu_scoring": args.cpu_scoring,
        "switch_interval_s": sys.getswitchinterval(),
        "plain_consume_per_s": round(plain),
        "scoring_alone_per_s": round(scoring_alone),
        "worker_scored_per_s": round(result["scored_per_s"]),
        "worker_acked_per_s": round(result["acked_per_s"]),
        "ratio_to_plain_consume": round(result["acked_per_s"] / plain, 3),
        "scorer_busy_share": round(result["inference_s"] / result["wall_s"], 3),
        "classes": args.classes or "all",
        "alert_share": round(result["alert_share"], 3),
        "batches": int(result["batches"]),
        "scoring_s": round(result["inference_s"], 3),
        "worker_wall_s": round(result["wall_s"], 3),
        "stages_s": result["stages_s"],
        "cpu_s": result["cpu_s"],
    }
    if "profile" in result:
        summary["profile"] = result["profile"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="a bundle (default: untrained)")
    parser.add_argument("--model-kind", default="mlp", choices=["mlp", "conv"])
    parser.add_argument("--records", type=int, default=50000)
    parser.add_argument("--batch", type=int, default=1024, help="stream.max_batch_size")
    parser.add_argument("--no-scores-topic", action="store_true")
    parser.add_argument("--scores-format", default="record", choices=["record", "batch"])
    parser.add_argument("--alert-format", default="record", choices=["record", "batch"])
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=StreamConfig().cpu_threads,
        help="stream.cpu_threads (0 = torch's default)",
    )
    parser.add_argument(
        "--cpu-scoring",
        default=StreamConfig().cpu_scoring,
        choices=["process", "inline"],
        help="stream.cpu_scoring",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval (s); default: what the worker sets (streams.worker_process)",
    )
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        default=None,
        help="stream.fetch_max_wait_ms on every engine (default: per engine, see --engine)",
    )
    parser.add_argument(
        "--guarantee",
        default="at_least_once",
        choices=["at_least_once", "exactly_once"],
        help="stream.processing_guarantee (exactly_once: the drain ends at the last commit)",
    )
    parser.add_argument(
        "--transaction-interval-ms", type=int, default=100, help="stream.transaction_interval_ms"
    )
    add_engine_options(parser)
    parser.add_argument("--profile", action="store_true", help="cProfile the worker thread")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["fp32", "int8", "bf16", "auto"],
        help="detector.precision (auto: fp32 for the untrained bundle, which validated nothing)",
    )
    parser.add_argument(
        "--device", default="auto", help="detector.device (auto: CUDA when present, else CPU)"
    )
    parser.add_argument(
        "--test-images", type=Path, default=FASHION_TEST, help="Fashion-MNIST's t10k images"
    )
    parser.add_argument(
        "--classes",
        type=int,
        nargs="+",
        default=None,
        help="replay only the test images of these classes (e.g. the bundle's normal ones: "
        "few alerts); default all ten",
    )
    args = parser.parse_args()
    images = fashion_images(args.test_images, args.classes)
    order = run_order(args.engine, args.repeats)
    runs: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.model or make_bundle(args.model_kind, Path(tmp) / "bundle", images)
        settings = DetectorSettings(device=args.device, precision=args.precision)
        detector = Detector.from_bundle(bundle, settings)
        for number, engine in enumerate(order, 1):
            label = f"run {number}/{len(order)}, {engine}: " if len(order) > 1 else ""
            summary = drain_run(args, engine, detector, images, label)
            profile = summary.pop("profile", None)
            print(json.dumps(summary, indent=2), flush=True)
            figures = {f"{engine} acked rec/s": summary["worker_acked_per_s"],
                       f"{engine} alert share": summary["alert_share"],
                       f"{engine} scoring alone rec/s": summary["scoring_alone_per_s"],
                       f"{engine} plain consume rec/s": summary["plain_consume_per_s"]}  # fmt: skip
            print("result: " + json.dumps(figures), flush=True)
            if profile:
                print(profile, flush=True)
            runs.append((engine, summary))
    if len(runs) > 1:
        print(f"\nbacklog drain, {args.records:,} records, runs in the order {', '.join(order)}:\n")
        print(side_by_side(runs))


if __name__ == "__main__":
    main()
