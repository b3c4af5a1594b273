"""Latency while the worker hot-swaps its model, against a run without swaps.

    .venv/bin/python bench/worker_swap.py --rate 1000 --duration 24 --every 4

Two runs of a real `vaewatch worker --model models/current` subprocess on the embedded broker,
scoring real Fashion-MNIST test images replayed at a steady rate; a subscriber in its own
process takes (arrival - record timestamp) for every alert and notes the alert's model_version.
Baseline: the link never moves. Swap run: every `--every` seconds the `current` link is flipped
(atomically) between two MLP bundles, so the worker loads, verifies and warms up the other one
in the background and swaps it in between batches. Printed side by side: p50/p99/max latency
over the whole run and within 2 s after each flip, the longest gap between two alerts, the
number of swaps the alerts show, and the worker's own load times (from its log). If loading
stalled the loop, the max latency after a flip would reach the load time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from worker_latency import partition_reader, wait_ready
from worker_throughput import fashion_images, make_bundle

from detector import Calibration, Detector, load_bundle, save_bundle
from detector.config import DetectorSettings
from streams.brokers.local import EmbeddedBroker, free_port
from streams.config import StreamConfig
from streams.kafka_io import create_producer, ensure_topics
from streams.replay import ArrayRecords, plan_replay, replay

WINDOW_S = 2.0


def read_alerts(bootstrap: str, ready: mp.Event, stop: mp.Event, out: mp.Queue) -> None:
    consumer = partition_reader(bootstrap, "swap.alerts", start="earliest")
    seen: list[tuple[float, float, str]] = []
    ready.set()
    while not stop.is_set():
        for records in consumer.poll(timeout_ms=20).values():
            now = time.time()
            for record in records:
                alert = json.loads(record.value)
                seen.append((now, now - alert["timestamp_ms"] / 1000.0, alert["model_version"]))
    consumer.close()
    out.put(seen)


def flip(link: Path, target: Path) -> None:
    staging = link.with_name(link.name + ".tmp")
    staging.unlink(missing_ok=True)
    staging.symlink_to(target)
    staging.replace(link)


def run(
    args: argparse.Namespace, images: np.ndarray, bundles: list[Path], *, swaps: bool, tmp: Path
) -> dict:
    with EmbeddedBroker() as broker:
        config = StreamConfig(
            bootstrap_servers=broker.bootstrap_servers,
            input_topic="swap.images",
            alert_topic="swap.alerts",
            dlq_topic="swap.dlq",
            group_id="swap",
        )
        ensure_topics(config=config, topics=["swap.images", "swap.alerts", "swap.dlq"])
        link = tmp / "current"
        flip(link, bundles[0])
        port = free_port()
        sets = [
            f"stream.bootstrap_servers={broker.bootstrap_servers}",
            "stream.input_topic=swap.images",
            "stream.alert_topic=swap.alerts",
            "stream.dlq_topic=swap.dlq",
            "stream.group_id=swap",
            "metrics.host=127.0.0.1",
            f"metrics.port={port}",
            "detector.device=cpu",
            "lifecycle.watch_interval_s=0.2",
            *args.overrides,
        ]
        command = [sys.executable, "-m", "vaewatch.cli"]
        for item in sets:
            command += ["--set", item]
        log_path = tmp / f"worker-{'swap' if swaps else 'base'}.log"
        with open(log_path, "wb") as log:
            worker = subprocess.Popen(
                [*command, "worker", "--model", str(link)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_ready(f"http://127.0.0.1:{port}")
            ctx = mp.get_context("spawn")
            ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
            reader = ctx.Process(
                target=read_alerts, args=(broker.bootstrap_servers, ready, stop, results)
            )
            reader.start()
            ready.wait(60)
            flips: list[float] = []

            def flipper() -> None:
                target = 1
                while not stop.wait(args.every):
                    flip(link, bundles[target])
                    flips.append(time.time())
                    target = 1 - target

            thread = threading.Thread(target=flipper) if swaps else None
            count = int(args.rate * args.duration)
            plan = plan_replay(labels=None, normal_classes=(0,), count=count, size=len(images))
            producer = create_producer(config=config.model_copy(update={"linger_ms": 5}))
            started = time.time()
            if thread is not None:
                thread.start()
            replay(
                producer=producer,
                topic="swap.images",
                records=ArrayRecords(images, labels=None),
                plan=plan,
                rate=args.rate,
            )
            time.sleep(2)
            stop.set()
            if thread is not None:
                thread.join()
            seen = results.get(timeout=60)
            reader.join()
            producer.close()
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    kept = [(at, lat, v) for at, lat, v in seen if at >= started + args.warmup]
    at = np.array([a for a, _, _ in kept])
    latency = np.array([lat for _, lat, _ in kept])
    near = np.zeros(len(kept), dtype=bool)
    for moment in flips:
        near |= (at >= moment) & (at < moment + WINDOW_S)
    versions = [v for _, _, v in sorted(kept)]
    changes = sum(1 for a, b in itertools.pairwise(versions) if a != b)
    loads = [
        float(s) for s in re.findall(r": loaded, version \w+, ([\d.]+) s", log_path.read_text())
    ]

    def q(values: np.ndarray, p: float) -> float:
        return round(float(np.percentile(values, p)) * 1000, 1) if values.size else float("nan")

    return {
        "alerts": len(kept),
        "p50_ms": q(latency, 50),
        "p99_ms": q(latency, 99),
        "max_ms": round(float(latency.max()) * 1000, 1),
        "after_flip_alerts": int(near.sum()),
        "after_flip_p99_ms": q(latency[near], 99),
        "after_flip_max_ms": round(float(latency[near].max()) * 1000, 1) if near.any() else None,
        "longest_gap_ms": round(float(np.diff(np.sort(at)).max()) * 1000, 1),
        "flips": len(flips),
        "version_changes_in_alerts": changes,
        "load_s": [round(s, 2) for s in loads],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--duration", type=float, default=24)
    parser.add_argument("--every", type=float, default=4, help="seconds between flips")
    parser.add_argument("--warmup", type=float, default=3, help="seconds not counted")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    images = fashion_images()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        first = make_bundle("mlp", tmp / "v1", images)
        bundle = load_bundle(first)
        with torch.no_grad():
            for parameter in bundle.model.parameters():
                parameter.mul_(1.01)
        # Same alert volume as v1: its threshold at the same quantile of its own scores.
        scores = Detector.from_bundle(bundle, DetectorSettings(device="cpu")).score(images[:2000])
        threshold = float(np.quantile(scores.scores, 0.9))
        calibration = Calibration(
            threshold=threshold, target_fpr=0.1, method="conformal", scores=scores.scores
        )
        second = tmp / "v2"
        save_bundle(second, model=bundle.model, calibration=calibration)
        baseline = run(args, images, [first, second], swaps=False, tmp=tmp)
        swapping = run(args, images, [first, second], swaps=True, tmp=tmp)
    print(f"{'':<28}{'baseline':>12}{'swaps':>12}{'ratio':>8}")
    for key in baseline:
        b, s = baseline[key], swapping[key]
        ratio = (
            f"{s / b:>8.2f}"
            if isinstance(b, (int, float)) and isinstance(s, (int, float)) and b
            else ""
        )
        print(f"{key:<28}{b!s:>12}{s!s:>12}{ratio}")


if __name__ == "__main__":
    main()
