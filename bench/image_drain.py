"""The worker's backlog drain with image-file records (PNG, JPEG) against raw records, side by side
in one run, and the decoding alone.

    .venv/bin/python bench/image_drain.py [--records 20000] [--repeats 2] [--model-kind mlp]

Records are real Fashion-MNIST test images, cycled, in each form: raw (the 784 bytes, the raw
codec), a 28 x 28 grey PNG, a 64 x 64 JPEG of quality 90 (the image codec, upscaled with
Pillow's bicubic filter). Each measurement runs the whole worker (`run_worker_process`, as
`vaewatch worker` does: consume, decode, score in the child process, publish alerts, commit) on
a fresh Tansu broker holding the records in one partition, and times from its first
acknowledged record to its last (the scoring process's start is not counted); the forms
alternate, so each sees the same machine load. The bundle is an untrained model with the
default preprocessing recorded (the scoring cost depends on the architecture, not the weights;
the MLP scores fast enough for decoding to show).

The image forms drain once with `images.decode_threads`'s default (one thread per core) and
once with one thread. Before the drains: decode_batch alone on batches of 1,024 records of each
form (and a 640 x 480 colour JPEG, a camera crop), with one decoding thread and with the
default, rounds interleaved.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from brokers import note, started_broker
from PIL import Image
from prometheus_client import CollectorRegistry
from worker_throughput import fashion_images, make_bundle

from detector import Detector, load_bundle, save_bundle
from detector.config import DetectorSettings
from detector.preprocess import ImageSettings, Preprocessing
from streams.brokers.local import free_port
from streams.codec import decode_batch, encode_images
from streams.config import MetricsConfig, StreamConfig
from streams.kafka_io import create_producer, ensure_topics
from streams.worker.metrics import OUTCOMES
from streams.worker_process import run_worker_process


def image_file(pixels: np.ndarray, *, size: tuple[int, int], fmt: str, rgb: bool = False) -> bytes:
    picture = Image.fromarray(pixels.reshape(28, 28))
    if size != (28, 28):
        picture = picture.resize(size, Image.Resampling.BICUBIC)
    if rgb:
        picture = picture.convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def forms(images: np.ndarray) -> dict[str, tuple[str, list[bytes]]]:
    """name -> (codec, one record value per image)."""
    return {
        "raw 784 B": ("raw", encode_images(images, codec="raw")),
        "PNG 28x28": ("image", [image_file(p, size=(28, 28), fmt="PNG") for p in images]),
        "JPEG 64x64 q90": ("image", [image_file(p, size=(64, 64), fmt="JPEG") for p in images]),
    }


def decode_alone(values: list[bytes], codec: str, settings: ImageSettings, rounds: int) -> dict:
    """Median µs per record of decode_batch with 1 thread and with the default threads."""
    one = settings.model_copy(update={"decode_threads": 1}).decoding(Preprocessing())
    default = settings.decoding(Preprocessing())
    times: dict[str, list[float]] = {"1 thread": [], f"{default.threads} threads": []}
    for _ in range(rounds):
        for samples, decoding in zip(times.values(), (one, default), strict=True):
            started = time.perf_counter()
            decoded = decode_batch(values, codec=codec, images=decoding)
            samples.append((time.perf_counter() - started) / len(values) * 1e6)
            assert decoded.n_valid == len(values), decoded.errors
    return {name: statistics.median(samples) for name, samples in times.items()}


def acked(registry: CollectorRegistry) -> float:
    return sum(
        registry.get_sample_value("vaewatch_records_total", {"outcome": outcome}) or 0.0
        for outcome in OUTCOMES
    )


def drain(
    values: list[bytes], codec: str, images: ImageSettings, bundle: Path, n: int, label: str
) -> dict:
    """Records/s of the whole worker over a backlog of `n` records on a fresh broker."""
    with started_broker("tansu", label=label) as broker:
        stream = StreamConfig(
            bootstrap_servers=broker.bootstrap_servers,
            input_topic="bench.images",
            alert_topic="bench.alerts",
            scores_topic="",
            dlq_topic="bench.dlq",
            group_id="bench",
            codec=codec,  # type: ignore[arg-type]
            # The scoring process loads torch while the first batch waits: on a loaded machine
            # that outlasts the default 10 s, and the group would evict the worker.
            max_poll_interval_ms=120_000,
        )
        ensure_topics(config=stream, topics=["bench.images", "bench.alerts", "bench.dlq"])
        producer = create_producer(config=stream.model_copy(update={"linger_ms": 20}))
        for i in range(n):
            producer.send("bench.images", value=values[i % len(values)], partition=0)
        producer.flush()
        producer.close()
        registry = CollectorRegistry()
        stop = threading.Event()
        detector = Detector.from_bundle(bundle, DetectorSettings(device="cpu"))
        worker = threading.Thread(
            target=run_worker_process,
            kwargs={
                "stream": stream,
                "metrics_config": MetricsConfig(host="127.0.0.1", port=free_port()),
                "detector": detector,
                "stop": stop,
                "registry": registry,
                "images": images,
            },
        )
        worker.start()
        first_at = first_count = None
        deadline = time.monotonic() + 600
        while (count := acked(registry)) < n and time.monotonic() < deadline:
            if first_at is None and count:
                first_at, first_count = time.perf_counter(), count
            time.sleep(0.005)
        ended = time.perf_counter()
        stop.set()
        worker.join()
    if count < n:
        raise RuntimeError(f"{label}: only {count} of {n} records acknowledged")
    if first_at is None or first_count > n / 2:
        raise RuntimeError(f"{label}: drained before it could be timed; raise --records")
    return {"per_s": (n - first_count) / (ended - first_at), "seconds": ended - first_at}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model-kind", default="mlp", choices=["mlp", "conv"])
    parser.add_argument("--decode-rounds", type=int, default=9)
    args = parser.parse_args()
    images = fashion_images()[:2048]
    print(f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    all_forms = forms(images)
    camera = [image_file(p, size=(640, 480), fmt="JPEG", rgb=True) for p in images[:256]]
    settings = ImageSettings()
    print("\ndecode_batch alone (µs per record, median of rounds):\n")
    threads = settings.decoding(Preprocessing()).threads
    print(f"| form | mean size | 1 thread | {threads} threads |")
    print("|---|---:|---:|---:|")
    for name, (codec, values) in [*all_forms.items(), ("JPEG 640x480 RGB", ("image", camera))]:
        batch = values[:1024]
        times = decode_alone(batch, codec, settings, args.decode_rounds)
        size = np.mean([len(v) for v in batch])
        cells = " | ".join(f"{t:.0f}" for t in times.values())
        print(f"| {name} | {size:.0f} B | {cells} |")
    sys.stdout.flush()
    with tempfile.TemporaryDirectory() as tmp:
        untrained = make_bundle(args.model_kind, Path(tmp) / "untrained", images)
        plain = load_bundle(untrained)
        bundle = Path(tmp) / "bundle"
        save_bundle(
            bundle, model=plain.model, calibration=plain.calibration, preprocessing=Preprocessing()
        )
        # The image forms with the default decoding threads and with one: which pays on 2 cores
        # shared with the scoring process and kafka-python's I/O thread.
        one_thread = settings.model_copy(update={"decode_threads": 1})
        runs = {"raw 784 B": ("raw 784 B", settings)}
        for name in list(all_forms)[1:]:
            runs[f"{name}, {threads} decode threads"] = (name, settings)
            runs[f"{name}, 1 decode thread"] = (name, one_thread)
        results: dict[str, list[float]] = {name: [] for name in runs}
        for repeat in range(args.repeats):
            order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
            for run in order:
                name, images_settings = runs[run]
                codec, values = all_forms[name]
                label = f"round {repeat + 1}, {run}: "
                result = drain(values, codec, images_settings, bundle, args.records, label)
                note(f"{label}{result['per_s']:,.0f} records/s")
                results[run].append(result["per_s"])
    raw = results["raw 784 B"]
    print(
        f"\nworker drain, {args.records:,} records, untrained {args.model_kind}, alerts only, "
        f"{args.repeats} rounds (load average {os.getloadavg()[0]:.1f} at the end):\n"
    )
    print("| records | records/s, per round | median | ratio to raw, median of rounds |")
    print("|---|---|---:|---:|")
    for name, per_s in results.items():
        ratios = [value / base for value, base in zip(per_s, raw, strict=True)]
        rounds = " / ".join(f"{value:,.0f}" for value in per_s)
        print(
            f"| {name} | {rounds} | {statistics.median(per_s):,.0f} | "
            f"{statistics.median(ratios):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
