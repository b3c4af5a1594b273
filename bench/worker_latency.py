"""Steady load: record-to-alert latency and the worker's memory over time.

    .venv/bin/python bench/worker_latency.py --rate 5000 --duration 30            # latency
    .venv/bin/python bench/worker_latency.py --rate 5000 --duration 300 --warmup 30   # RSS
    .venv/bin/python bench/worker_latency.py --rate 5000 --duration 30 --relay    # baseline
    .venv/bin/python bench/worker_latency.py --rate 2000 --duration 60 --scores-format batch
    .venv/bin/python bench/worker_latency.py --rate 5000 --tree /tmp/base   # another checkout
    .venv/bin/python bench/worker_latency.py --rate 5000 --duration 30 --engine both --repeats 2
    .venv/bin/python bench/worker_latency.py --rate 2000 --duration 20 --engine both --against-relay

--engine picks the broker (bench/brokers.py): the embedded Tansu (default), a real Apache Kafka,
or both alternating in one invocation, each run on a fresh broker; with more than one run a
side-by-side table (medians, ratio kafka / tansu) follows the runs' results. The worker, the
relay and the subscriber use stream.fetch_max_wait_ms 10 ms on Tansu and 500 ms on Kafka unless
--set stream.fetch_max_wait_ms=... says otherwise.

--tree runs the worker from another checkout of vaewatch (its cwd and PYTHONPATH), so that two
versions are measured by the same script. The worker's per-stage timings
(vaewatch_stage_seconds, where it exports them) are read from its /metrics at the end.

A real `vaewatch worker` subprocess (max_batch_delay_ms 10 unless --set says otherwise) scores
real Fashion-MNIST test images replayed at a steady rate. A subscriber on the alert topic, in a
process of its own as a downstream service would be, takes for every alert (time it arrived) -
(the input record's timestamp, set when it was produced): the latency that service sees. The
RSS of the worker and of its scoring process is sampled from /proc every 5 s.

--relay replaces the worker by the baseline: a bare kafka-python consumer that re-produces every
10th record at once as an alert (no batching wait, no decoding, no scoring, no commits), with
the worker's producer settings. Its latency is the floor of two Kafka hops through the broker
with everything on this machine; what the worker adds is the difference.

--against-relay runs the relay and the worker one after the other on each broker run (a fresh
broker each, alternating, so that both see the same machine) and ends with a table per engine:
both sides' p50 and p99, what the worker adds to the relay's p99 and the ratio of the two.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parent))
from brokers import (
    FETCH_MAX_WAIT_MS,
    add_engine_options,
    process_cpu_s,
    run_order,
    side_by_side,
    started_broker,
)
from worker_throughput import fashion_images, make_bundle

from streams.brokers.local import free_port
from streams.config import StreamConfig
from streams.kafka_io import create_producer, ensure_topics
from streams.replay import ArrayRecords, plan_replay, replay
from streams.worker.publish import output_values


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and its children (the worker and its scoring process)."""
    return rss_mib(pid) + sum(rss_mib(child) for child in children(pid))


def partition_reader(
    bootstrap: str, topic: str, *, start: str, fetch_wait_ms: int
) -> KafkaConsumer:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset=start,
        enable_auto_commit=False,
        # exactly_once: an alert arrives when its transaction commits, as for a subscriber
        isolation_level="read_committed",
        # the worker's: Tansu holds an empty fetch for up to half of it, Kafka until data comes
        fetch_max_wait_ms=fetch_wait_ms,
    )
    consumer.assign([TopicPartition(topic, 0)])
    return consumer


def read_alerts(
    bootstrap: str, fetch_wait_ms: int, ready: mp.Event, stop: mp.Event, out: mp.Queue
) -> None:
    """The subscriber: (arrival, latency s, record -> scored_at s) per alert. The split shows
    whether the time is spent before scoring (fetch, batching) or after (publish, the
    subscriber's own fetch)."""
    consumer = partition_reader(
        bootstrap, "lat.alerts", start="earliest", fetch_wait_ms=fetch_wait_ms
    )
    latencies: list[tuple[float, float, float]] = []
    ready.set()
    while not stop.is_set():
        for records in consumer.poll(timeout_ms=50).values():
            now = time.time()
            for record in records:
                for value in output_values(record.value, record.headers):  # frames too
                    alert = json.loads(value)
                    created = alert["timestamp_ms"] / 1000.0
                    scored = alert["scored_at_ms"] / 1000.0
                    latencies.append((now, now - created, scored - created))
    consumer.close()
    out.put(latencies)


def relay_records(bootstrap: str, fetch_wait_ms: int, ready: mp.Event, stop: mp.Event) -> None:
    """The --relay baseline (see the module docstring)."""
    consumer = partition_reader(
        bootstrap, "lat.images", start="latest", fetch_wait_ms=fetch_wait_ms
    )
    consumer.poll(timeout_ms=100)  # resolves the position before the load starts
    producer = create_producer(config=StreamConfig(bootstrap_servers=bootstrap))
    ready.set()
    while not stop.is_set():
        for records in consumer.poll(timeout_ms=50).values():
            now_ms = int(time.time() * 1000)
            for record in records[::10]:
                alert = {"timestamp_ms": record.timestamp, "scored_at_ms": now_ms}
                producer.send("lat.alerts", value=json.dumps(alert).encode(), partition=0)
    producer.close()
    consumer.close()


def stage_quantiles(url: str) -> dict[str, dict[str, float]]:
    """p50, p99 and max bucket bound of each stage of vaewatch_stage_seconds, from /metrics."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for line in text.splitlines():
        if line.startswith("vaewatch_stage_seconds_bucket{"):
            labels, value = line.rsplit(" ", 1)
            fields = dict(part.split("=") for part in labels[labels.index("{") + 1 : -1].split(","))
            bound = float(fields["le"].strip('"'))
            buckets.setdefault(fields["stage"].strip('"'), []).append((bound, float(value)))
    result = {}
    for stage, counts in buckets.items():
        counts.sort()
        total = counts[-1][1]
        if not total:
            continue

        def bound_for(q: float, counts=counts, total=total) -> float:
            return next(b for b, c in counts if c >= q * total)

        top = next(b for b, c in counts if c >= total)
        result[stage] = {"p50_le": bound_for(0.5), "p99_le": bound_for(0.99), "max_le": top}
        result[stage]["batches"] = int(total)
    return result


def wait_ready(url: str, timeout_s: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("worker not ready")


def fetch_wait_for(engine: str, overrides: list[str]) -> int:
    """stream.fetch_max_wait_ms for the engine, unless a --set gives it."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("stream.fetch_max_wait_ms=")]
    return int(given[-1]) if given else FETCH_MAX_WAIT_MS[engine]


def worker_log_for(args: argparse.Namespace, engine: str, number: int, runs: int) -> Path | None:
    """--worker-log, or with several runs one file per run beside it (W.kafka.2.log)."""
    if args.worker_log is None or runs == 1:
        return args.worker_log
    return args.worker_log.with_name(
        f"{args.worker_log.stem}.{engine}.{number}{args.worker_log.suffix}"
    )


def measure(
    args: argparse.Namespace,
    engine: str,
    bundle: Path,
    images: np.ndarray,
    *,
    label: str,
    worker_log: Path | None,
) -> dict[str, Any]:
    """One run on a fresh broker of `engine`: its result."""
    fetch_wait_ms = fetch_wait_for(engine, args.overrides)
    detail = f", stream.fetch_max_wait_ms {fetch_wait_ms}"
    with started_broker(engine, label=label, detail=detail) as broker:
        description = broker.description
        config = StreamConfig(
            bootstrap_servers=broker.bootstrap_servers,
            input_topic="lat.images",
            alert_topic="lat.alerts",
            dlq_topic="lat.dlq",
            group_id="lat",
        )
        ensure_topics(config=config, topics=["lat.images", "lat.alerts", "lat.dlq", "lat.scores"])
        port = free_port()
        sets = [
            f"stream.bootstrap_servers={broker.bootstrap_servers}",
            "stream.input_topic=lat.images",
            "stream.alert_topic=lat.alerts",
            "stream.dlq_topic=lat.dlq",
            "stream.group_id=lat",
            "stream.max_batch_delay_ms=10",
            f"stream.fetch_max_wait_ms={fetch_wait_ms}",
            "metrics.host=127.0.0.1",
            f"metrics.port={port}",
            "detector.device=cpu",
            *(
                ["stream.scores_topic=lat.scores", f"stream.scores_format={args.scores_format}"]
                if args.scores_format
                else []
            ),
            *args.overrides,
        ]
        command = [sys.executable, "-m", "vaewatch.cli"]
        for item in sets:
            command += ["--set", item]
        level = "INFO" if worker_log else "WARNING"
        command += ["--log-level", level, "worker", "--model", str(bundle)]
        ctx = mp.get_context("spawn")
        relay_ready, relay_stop = ctx.Event(), ctx.Event()
        if args.relay:
            worker: Any = ctx.Process(
                target=relay_records,
                args=(broker.bootstrap_servers, fetch_wait_ms, relay_ready, relay_stop),
            )
            worker.start()
        else:
            env = dict(os.environ)
            if args.tree is not None:
                env["PYTHONPATH"] = str(args.tree.resolve())
            log = open(worker_log, "wb") if worker_log else None  # noqa: SIM115
            worker = subprocess.Popen(
                command, cwd=args.tree or None, env=env, stdout=log, stderr=log
            )
        try:
            if args.relay:
                relay_ready.wait(60)
            else:
                wait_ready(f"http://127.0.0.1:{port}")
            subscriber_ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
            reader = ctx.Process(
                target=read_alerts,
                args=(broker.bootstrap_servers, fetch_wait_ms, subscriber_ready, stop, results),
            )
            reader.start()
            subscriber_ready.wait(60)
            rss: list[tuple[float, float]] = []

            def sample_rss() -> None:
                while not stop.is_set():
                    rss.append((time.time(), tree_rss_mib(worker.pid)))
                    stop.wait(5)

            sampler = threading.Thread(target=sample_rss)
            sampler.start()
            count = int(args.rate * args.duration)
            plan = plan_replay(labels=None, normal_classes=(0,), count=count, size=len(images))
            # linger 5 ms: with 0, every record is its own produce request, and at 1,000/s the
            # load generator alone kept most of a core busy (kafka-python's per-request cost),
            # starving the worker on 2 cores. The record timestamp is taken at send(), so the
            # linger is counted in the latency (conservative).
            producer = create_producer(config=config.model_copy(update={"linger_ms": 5}))
            measured = "relay" if args.relay else "worker"
            processes = {
                "generator (this process)": os.getpid(),
                "broker": broker.pid,
                measured: worker.pid,
                **{
                    f"{measured}'s child {number}": pid
                    for number, pid in enumerate(children(worker.pid), 1)
                },
                "subscriber": reader.pid,
            }
            cpu_before = {name: process_cpu_s(pid) for name, pid in processes.items()}
            started = time.time()
            busy_before = machine_busy()
            replay(
                producer=producer,
                topic="lat.images",
                records=ArrayRecords(images, labels=None),
                plan=plan,
                rate=args.rate,
            )
            produced_s = time.time() - started
            busy_after = machine_busy()
            cpu_used = {
                name: round((process_cpu_s(pid) - cpu_before[name]) / produced_s, 3)
                for name, pid in processes.items()
            }
            time.sleep(2)
            stages = {} if args.relay else stage_quantiles(f"http://127.0.0.1:{port}/metrics")
            stop.set()
            latencies: list[tuple[float, float, float]] = results.get(timeout=60)
            reader.join()
            sampler.join()
            producer.close()
        finally:
            if args.relay:
                relay_stop.set()
                worker.join(60)
                code = worker.exitcode
            else:
                worker.terminate()
                code = worker.wait(timeout=60)
    kept = [(lat, to_score) for at, lat, to_score in latencies if at >= started + args.warmup]
    counted = np.array([lat for lat, _ in kept])
    to_scored = np.array([to_score for _, to_score in kept])
    rss_after_warmup = [m for at, m in rss if at >= started + args.warmup]
    return {
        "broker": description,
        "fetch_max_wait_ms": fetch_wait_ms,
        "rate_target_per_s": args.rate,
        "rate_produced_per_s": round(count / produced_s),
        "duration_s": args.duration,
        "alerts": len(latencies),
        "alerts_counted": int(counted.size),
        "latency_ms": {
            f"p{q}": round(float(np.percentile(counted, q)) * 1000, 1) for q in (50, 90, 99, 99.9)
        }
        | {"max": round(float(counted.max()) * 1000, 1)},
        # record timestamp -> the worker's scored_at_ms (fetch, batching, decode, scoring)
        "to_scored_ms": {
            f"p{q}": round(float(np.percentile(to_scored, q)) * 1000, 1) for q in (50, 90, 99)
        },
        "rss_mib": {
            "first": round(rss_after_warmup[0], 1),
            "last": round(rss_after_warmup[-1], 1),
            "min": round(min(rss_after_warmup), 1),
            "max": round(max(rss_after_warmup), 1),
            "samples": len(rss_after_warmup),
            "last_vs_first": round(rss_after_warmup[-1] / rss_after_warmup[0] - 1, 4),
        },
        # every process on the machine (generator, broker, worker, subscriber) while producing
        "machine_cpu_busy": round(
            (busy_after[0] - busy_before[0]) / (busy_after[1] - busy_before[1]), 3
        ),
        # CPU seconds per second of producing; the broker is the Tansu process or Kafka's JVM
        "cores_used_by": cpu_used,
        "worker_exit_code": code,
        "overrides": args.overrides,
        "tree": str(args.tree or Path.cwd()),
        "scores_format": args.scores_format or "(no scores topic)",
        # per batch, from the worker's vaewatch_stage_seconds histogram (whole run, warm-up
        # included): bucket upper bounds that hold the 50th / 99th percentile and the maximum
        "stage_seconds": stages,
        "group_assignments": (
            worker_log.read_text(errors="replace").count("partitions assigned")
            if worker_log
            else None
        ),
        "measured": "relay baseline" if args.relay else "vaewatch worker",
    }


def _median(runs: list[tuple[str, dict[str, Any]]], engine: str, *path: str) -> float:
    values = []
    for name, result in runs:
        if name == engine:
            for key in path:
                result = result[key]
            values.append(result)
    return statistics.median(values)


def against_relay(
    workers: list[tuple[str, dict[str, Any]]], relays: list[tuple[str, dict[str, Any]]]
) -> str:
    """A markdown table per engine: medians over its runs of the relay's and the worker's record-
    to-alert p50 and p99, what the worker adds to the relay's p99, and the ratio of the p99s."""
    lines = [
        "| broker | runs | relay p50 / p99 (ms) | worker p50 / p99 (ms) | worker adds at p99 (ms) "
        "| p99 ratio | machine CPU busy (relay / worker) |",
        "|---|---:|---|---|---:|---:|---|",
    ]
    for engine in dict.fromkeys(engine for engine, _ in workers):
        relay = {q: _median(relays, engine, "latency_ms", q) for q in ("p50", "p99")}
        worker = {q: _median(workers, engine, "latency_ms", q) for q in ("p50", "p99")}
        busy = [_median(runs, engine, "machine_cpu_busy") for runs in (relays, workers)]
        lines.append(
            f"| {engine} | {sum(1 for e, _ in workers if e == engine)} "
            f"| {relay['p50']:.0f} / {relay['p99']:.0f} "
            f"| {worker['p50']:.0f} / {worker['p99']:.0f} "
            f"| {worker['p99'] - relay['p99']:+.0f} | {worker['p99'] / relay['p99']:.2f} "
            f"| {busy[0]:.2f} / {busy[1]:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=5, help="seconds not counted")
    parser.add_argument("--model-kind", default="mlp", choices=["mlp", "conv"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--relay", action="store_true", help="the baseline instead of a worker")
    parser.add_argument("--tree", type=Path, default=None, help="run the worker from this checkout")
    parser.add_argument(
        "--model", type=Path, default=None, help="a bundle (default: an untrained one, made here)"
    )
    parser.add_argument(
        "--worker-log",
        type=Path,
        default=None,
        help="write the worker's INFO log here and count its rebalances (partitions assigned); "
        "with several runs, one file per run beside it (W.tansu.1.log, W.kafka.2.log, ...)",
    )
    parser.add_argument(
        "--scores-format",
        default="",
        choices=["", "record", "batch"],
        help="also write scores (to lat.scores) in this format; default: alerts only",
    )
    parser.add_argument(
        "--against-relay",
        action="store_true",
        help="each run twice, the relay baseline then the worker, and a table of what it adds",
    )
    add_engine_options(parser)
    args = parser.parse_args()
    if args.against_relay and args.relay:
        parser.error("--against-relay already runs the relay")
    images = fashion_images()
    order = run_order(args.engine, args.repeats)
    runs: list[tuple[str, dict[str, Any]]] = []
    relay_runs: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.model or make_bundle(args.model_kind, Path(tmp) / "bundle", images)
        for number, engine in enumerate(order, 1):
            label = f"run {number}/{len(order)}, {engine}: " if len(order) > 1 else ""
            worker_log = worker_log_for(args, engine, number, len(order))
            if args.against_relay:
                relay_args = argparse.Namespace(**{**vars(args), "relay": True})
                relay = measure(relay_args, engine, bundle, images, label=label, worker_log=None)
                print(json.dumps(relay, indent=2), flush=True)
            result = measure(args, engine, bundle, images, label=label, worker_log=worker_log)
            print(json.dumps(result, indent=2), flush=True)
            runs.append((engine, result))
            if args.against_relay:
                relay_runs.append((engine, relay))
    if args.against_relay:
        print(f"\nworker against the relay at {args.rate:,.0f} rec/s, {args.duration:g} s each:\n")
        print(against_relay(runs, relay_runs))
        figures = {}
        for engine in dict.fromkeys(engine for engine, _ in runs):
            for side, side_runs in (("relay", relay_runs), ("worker", runs)):
                for q in ("p50", "p99"):
                    value = _median(side_runs, engine, "latency_ms", q)
                    figures[f"{engine} {args.rate:.0f}/s {side} {q} ms"] = value
            adds = figures[f"{engine} {args.rate:.0f}/s worker p99 ms"]
            adds -= figures[f"{engine} {args.rate:.0f}/s relay p99 ms"]
            figures[f"{engine} {args.rate:.0f}/s worker adds at p99 ms"] = adds
        print("result: " + json.dumps(figures), flush=True)
    elif len(runs) > 1:
        what = "relay baseline" if args.relay else "vaewatch worker"
        print(
            f"\n{what} at {args.rate:,.0f} rec/s for {args.duration:g} s, runs in the order "
            f"{', '.join(order)}:\n"
        )
        print(side_by_side(runs))


if __name__ == "__main__":
    main()
