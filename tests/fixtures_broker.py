"""Fixtures that start a real broker (owned by the streams work).

- `kafka_broker` (session): one real broker on a free port, stopped at the end. Apache Kafka
  (KRaft, one node) by default, the broker users run; `VAEWATCH_TEST_BROKER=tansu` runs the
  live suite on the embedded Tansu instead. A broker that cannot start fails the tests that
  need it: there is no silent fallback to the other engine.
- `tansu_broker` (session): the embedded Tansu, for the smoke tests that keep vaewatch's
  light default engine tested whatever `kafka_broker` is.
- `fresh_topics` (function): unique topic and group names for one test. Tansu wedges a group
  whose first member leaves before its join completes, so every test gets its own group; on
  Apache Kafka, which has no such quirk, the fresh names only keep the tests apart.
- `start_worker(...)`: runs `vaewatch worker` as a subprocess and waits for /readyz; returns a
  `WorkerProcess` with `.stop()` (SIGTERM, wait, exit code) and the metrics URL.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from streams.brokers.local import Broker, create_broker, free_port
from streams.config import StreamConfig
from streams.kafka_io import ensure_topics

__all__ = [
    "TEST_ENGINE",
    "StreamTopics",
    "WorkerProcess",
    "fresh_topics",
    "kafka_broker",
    "start_worker",
    "tansu_broker",
    "wait_alive",
    "wait_ready",
]

_counter = itertools.count()
TEST_ENGINE = os.environ.get("VAEWATCH_TEST_BROKER", "kafka")


def _session_broker(engine: str, folder: Path) -> Iterator[Broker]:
    broker = create_broker(engine, log_path=folder / f"{engine}.log")
    broker.start(timeout_s=120.0)  # BrokerError (one line, naming the log) fails the tests
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The live suite's broker: Apache Kafka unless VAEWATCH_TEST_BROKER says tansu."""
    yield from _session_broker(TEST_ENGINE, tmp_path_factory.mktemp("broker"))


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The embedded Tansu broker (in memory), for the smoke tests of the default engine."""
    yield from _session_broker("tansu", tmp_path_factory.mktemp("tansu"))


@dataclass(frozen=True)
class StreamTopics:
    """A StreamConfig with this test's own topics and group, on the session broker."""

    config: StreamConfig

    @property
    def bootstrap_servers(self) -> str:
        return self.config.bootstrap_servers

    def settings_args(self) -> list[str]:
        """`--set` arguments that give a `vaewatch` subprocess the same stream settings."""
        keys = (
            "bootstrap_servers",
            "input_topic",
            "alert_topic",
            "scores_topic",
            "dlq_topic",
            "group_id",
            "codec",
            "max_batch_size",
            "max_batch_delay_ms",
        )
        args: list[str] = []
        for key in keys:
            value = getattr(self.config, key)
            args += ["--set", f"stream.{key}={json.dumps(value)}"]
        return args


def make_topics(
    broker: Broker,
    *,
    partitions: int = 1,
    scores: bool = True,
    input_configs: dict[str, str] | None = None,
    output_configs: dict[str, dict[str, str]] | None = None,
    **overrides: object,
) -> StreamTopics:
    """Fresh topics and group on `broker`; `input_configs`: topic-level configs of the input,
    `output_configs`: of the outputs, by setting name ("alert_topic", "dlq_topic", ...)."""
    n = next(_counter)
    stem = f"t{os.getpid()}-{n}"
    config = StreamConfig(
        bootstrap_servers=broker.bootstrap_servers,
        input_topic=f"{stem}.images",
        alert_topic=f"{stem}.alerts",
        scores_topic=f"{stem}.scores" if scores else "",
        dlq_topic=f"{stem}.dlq",
        group_id=f"{stem}.group",
        **overrides,  # type: ignore[arg-type]
    )
    ensure_topics(
        config=config, topics=[config.input_topic], partitions=partitions, configs=input_configs
    )
    for name, configs in (output_configs or {}).items():
        ensure_topics(config=config, topics=[getattr(config, name)], configs=configs)
    ensure_topics(
        config=config,
        topics=[config.alert_topic, config.scores_topic, config.dlq_topic],
        partitions=1,
    )
    return StreamTopics(config=config)


@pytest.fixture
def fresh_topics(kafka_broker: Broker) -> StreamTopics:
    """Unique input/alert/scores/dlq topics (1 partition each) and group for one test."""
    return make_topics(kafka_broker)


def _wait_for(
    url: str, *, timeout_s: float, process: subprocess.Popen | None, before: str
) -> tuple[bytes | None, str]:
    """Poll `url` until it answers 200: (body, "") then, or (None, the last error) at the
    deadline. Raises if `process` exits first."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"worker exited with code {process.returncode} before {before}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.read(), ""
        except urllib.error.HTTPError as exc:
            last = exc.read().decode()
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    return None, last


def wait_ready(url: str, *, timeout_s: float = 30.0, process: subprocess.Popen | None = None):
    """Poll `url`/readyz until it answers 200; returns its JSON body."""
    body, last = _wait_for(f"{url}/readyz", timeout_s=timeout_s, process=process, before="ready")
    if body is None:
        raise TimeoutError(f"worker not ready after {timeout_s} s: {last}")
    return json.loads(body)


def wait_alive(url: str, *, timeout_s: float = 60.0, process: subprocess.Popen | None = None):
    """Poll `url`/healthz until the worker's HTTP server answers 200 (it starts after the model
    is loaded, which takes seconds in a cold process)."""
    body, last = _wait_for(f"{url}/healthz", timeout_s=timeout_s, process=process, before="serving")
    if body is None:
        raise TimeoutError(f"worker not serving /healthz after {timeout_s} s: {last}")


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT (metrics at /metrics)
    log_path: Path

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as response:
            return response.read().decode()

    def stop(self, *, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait for the drain; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s=timeout_s)

    def wait(self, *, timeout_s: float) -> int:
        """The exit code, once the process has ended; SIGKILL and raise past `timeout_s`."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def wait_ready(self, *, timeout_s: float) -> None:
        """Until /readyz says ready; else SIGKILL, and an error that carries the log."""
        try:
            wait_ready(self.url, timeout_s=timeout_s, process=self.process)
        except Exception:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"worker did not get ready; its log:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, series: str) -> float:
        """The value of one series on /metrics, e.g. 'vaewatch_errors_total{kind="decode"}'."""
        return metric_value(self.metrics_text(), series)

    def scoring_child(self) -> int:
        """The pid of the worker's scoring process (multiprocessing's spawned child)."""
        pid = self.process.pid
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
        raise AssertionError("no scoring process")


def metric_value(text: str, series: str) -> float:
    """The value of one series in a Prometheus text exposition; absent is a failure."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in the metrics")


def start_worker(
    *,
    model: Path,
    topics: StreamTopics,
    log_dir: Path,
    extra_args: list[str] | None = None,
    wait: bool = True,
    timeout_s: float = 30.0,
) -> WorkerProcess:
    """Start `vaewatch worker --model MODEL` on the topics' broker, metrics on a free port, and
    (by default) wait until /readyz says ready: partitions assigned, so stopping it is safe."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"worker-{port}.log"
    command = [
        sys.executable,
        "-m",
        "vaewatch.cli",
        *topics.settings_args(),
        "--set",
        "metrics.host=127.0.0.1",
        "--set",
        f"metrics.port={port}",
        "--set",
        "detector.device=cpu",
        *(extra_args or []),
        "worker",
        "--model",
        str(model),
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    worker = WorkerProcess(process=process, url=f"http://127.0.0.1:{port}", log_path=log_path)
    if wait:
        worker.wait_ready(timeout_s=timeout_s)
    return worker
