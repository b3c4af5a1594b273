"""`/v1/score` under concurrent load, next to the detector's own rate on the same machine.

    .venv/bin/python bench/serve_load.py                       # 1, 16, 64 clients, 10 s each
    .venv/bin/python bench/serve_load.py --clients 1 16 --duration 5 --model models/demo

A real `vaewatch serve` subprocess (an untrained model of --model-kind, conv by default, unless
--model names a bundle: the speed does not depend on the weights) is called by N client threads
in this process, each on its own keep-alive connection, one real Fashion-MNIST test image per
request as JSON ({"images": [[784 ints]]}), back to back for --duration seconds after a
warm-up. Per client count: requests/s, p50 and p99 latency, the mean micro-batch the service
formed (from its /metrics), 503s. Baselines, in this process, on the same
model: the detector scoring one image per call (what a service without batching could do at
best) and whole batches of --batch images (the device's ceiling). Clients and service share the
machine's cores; the load average is printed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_throughput import fashion_images, make_bundle

from detector import Detector
from detector.config import DetectorSettings
from streams.brokers.local import free_port


def detector_rates(bundle: Path, images: np.ndarray, *, batch: int) -> tuple[float, float]:
    """(images/s one image per call, images/s in batches of `batch`) of the raw detector."""
    detector = Detector.from_bundle(bundle, DetectorSettings(device="cpu"))
    for _ in range(20):
        detector.score(images[:1])
    started, n = time.perf_counter(), 0
    while time.perf_counter() - started < 3.0:
        detector.score(images[n % len(images)][None, :])
        n += 1
    single = n / (time.perf_counter() - started)
    detector.score(images[:batch])
    started, n = time.perf_counter(), 0
    while time.perf_counter() - started < 3.0:
        detector.score(images[:batch])
        n += batch
    return single, n / (time.perf_counter() - started)


def wait_ready(port: int, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vaewatch serve exited with {process.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("vaewatch serve not ready")


def batch_stats(port: int) -> tuple[float, float]:
    """(sum, count) of the service's micro-batch sizes so far."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    values = {}
    for line in text.splitlines():
        for name in (
            "vaewatch_serve_batch_size_images_sum",
            "vaewatch_serve_batch_size_images_count",
        ):
            if line.startswith(name + " "):
                values[name] = float(line.split()[-1])
    return values["vaewatch_serve_batch_size_images_sum"], values[
        "vaewatch_serve_batch_size_images_count"
    ]


def load(port: int, bodies: list[bytes], clients: int, duration_s: float) -> dict[str, float]:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    rejected = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.connect()
        # http.client sends headers and body in two writes: without TCP_NODELAY, Nagle's
        # algorithm holds the body until the server's delayed ACK, 40 ms per request.
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        headers = {"Content-Type": "application/json"}
        start.wait()
        k = i
        while time.perf_counter() < stop_at[0]:
            sent = time.perf_counter()
            connection.request("POST", "/v1/score", body=bodies[k % len(bodies)], headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status == 503:
                rejected[i] += 1
            elif response.status != 200:
                raise RuntimeError(f"status {response.status}")
            else:
                latencies[i].append(time.perf_counter() - sent)
            k += clients
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    stop_at[0] = began + duration_s
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    merged = np.concatenate([np.asarray(x) for x in latencies])
    return {
        "requests_per_s": len(merged) / elapsed,
        "p50_ms": float(np.percentile(merged, 50) * 1000),
        "p99_ms": float(np.percentile(merged, 99) * 1000),
        "rejected": float(sum(rejected)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="bundle (default: a fresh one)")
    parser.add_argument("--model-kind", choices=["conv", "mlp"], default="conv")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1024, help="raw detector batch size")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    # One torch thread here and in the service (serve.cpu_threads' default): the baselines
    # and the service score alike.
    torch.set_num_threads(1)

    images = fashion_images()
    with tempfile.TemporaryDirectory() as scratch:
        bundle = args.model or make_bundle(args.model_kind, Path(scratch) / "bundle", images)
        single, batched = detector_rates(bundle, images, batch=args.batch)
        port = free_port()
        command = [sys.executable, "-m", "vaewatch.cli", "--set", "detector.device=cpu"]
        command += [f"--set={o}" for o in args.overrides]
        command += ["serve", "--model", str(bundle), "--port", str(port)]
        log = open(Path(scratch) / "serve.log", "wb")  # noqa: SIM115 - closed below
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(port, process)
            bodies = [json.dumps({"images": [image.tolist()]}).encode() for image in images[:512]]
            load(port, bodies, 4, 2.0)  # warm-up
            print(
                f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start"
            )
            print(f"detector, 1 image per call:     {single:10,.0f} images/s")
            print(f"detector, batches of {args.batch:<5d}:     {batched:10,.0f} images/s")
            print("clients  requests/s  p50 ms  p99 ms  mean batch  503s  vs 1-image  vs batched")
            for clients in args.clients:
                before = batch_stats(port)
                result = load(port, bodies, clients, args.duration)
                after = batch_stats(port)
                mean_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                print(
                    f"{clients:7d}  {result['requests_per_s']:10,.0f}  {result['p50_ms']:6.1f}  "
                    f"{result['p99_ms']:6.1f}  {mean_batch:10.1f}  {result['rejected']:4.0f}  "
                    f"{result['requests_per_s'] / single:9.2f}x  "
                    f"{result['requests_per_s'] / batched:9.3f}x",
                    flush=True,
                )
            print(f"load average {os.getloadavg()[0]:.2f} at the end")
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.close()


if __name__ == "__main__":
    main()
