"""deploy/'s Prometheus rules and Grafana dashboard against a live worker.

A real `vaewatch worker` (subprocess, trained bundle) consumes real Fashion-MNIST records from
the embedded Kafka-compatible broker; a real Prometheus (Debian's package) scrapes it every
second with deploy/prometheus/rules.yml loaded, from a config generated out of
deploy/prometheus/prometheus.yml (scrape target and intervals replaced, nothing else). Then every
dashboard panel's query runs through Prometheus's HTTP API and must return data, every rule must
evaluate without error, the anomaly-rate recording rules must equal the worker's own counters,
and the anomaly-rate and dead-letter alerts must be pending on this anomalous stream.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from streams.brokers.local import free_port
from streams.kafka_io import create_producer
from tests.deploy.deploy_files import (
    JOB,
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    SERVE_JOB,
    dashboard_queries,
    label_values_metric,
    load_yaml,
    substitute_grafana_variables,
    template_queries,
)
from tests.deploy.prometheus_api import Prometheus
from tests.fixtures_broker import make_topics, start_worker
from tests.serve.http_helpers import start_serve_process

pytestmark = pytest.mark.slow

N_IMAGES = 2000  # real Fashion-MNIST test images, all ten classes (the model's normal one is 0)
N_MALFORMED = 40  # 784-byte records expected; these are 100 bytes: dead letters (~2%)
RATE_INTERVAL = "1m"  # what $__rate_interval stands for in the panel queries


def _prometheus_binary() -> str:
    path = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(path).exists():
        pytest.fail("prometheus not found: install Debian's `prometheus` package (.ci/run does)")
    return path


def live_config(target: str, serve_target: str | None = None) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the vaewatch job scraping `target` (and the
    vaewatch-serve job `serve_target`) every second and the rules evaluated every second; same
    rule files, same job names and paths."""
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"]["scrape_interval"] = "1s"
    config["global"]["scrape_timeout"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    assert len(jobs) == 1, f"deploy's prometheus.yml must have one job {JOB!r}"
    job = jobs[0]
    for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
        del job[key]
    job.pop("scrape_interval", None)
    job.pop("scrape_timeout", None)
    job["static_configs"] = [{"targets": [target]}]
    serve_jobs = [job for job in config["scrape_configs"] if job["job_name"] == SERVE_JOB]
    assert len(serve_jobs) == 1, f"deploy's prometheus.yml must have one job {SERVE_JOB!r}"
    for key in [k for k in serve_jobs[0] if k.endswith("_sd_configs") or k == "static_configs"]:
        del serve_jobs[0][key]
    serve_jobs[0]["static_configs"] = [{"targets": [serve_target or "127.0.0.1:1"]}]
    return config


def _wait(
    what: str,
    check: Callable[[], Any],
    timeout_s: float,
    context: Callable[[], str] = lambda: "",
) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` and `context()`."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(
        f"timed out after {timeout_s} s waiting for {what} (last: {last}){context()}"
    )


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    processes: list[subprocess.Popen] = []

    def start(target: str, serve_target: str | None = None) -> Prometheus:
        config_path = tmp_path / "prometheus.yml"
        config = live_config(target, serve_target)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [
                _prometheus_binary(),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        processes.append(process)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"prometheus exited {process.returncode}:\n"
                    + (tmp_path / "prometheus.log").read_text(errors="replace")
                )
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                    return response.status == 200
            except OSError:
                return False

        _wait("Prometheus to start", ready, 30)
        return Prometheus(url)

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _worker_counters(metrics_text: str) -> dict[str, dict[str, float]]:
    """{family: {label string: value}} of the worker's own exposition."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out


def _request_the_service(url: str, images: np.ndarray) -> None:
    """Score and explain real images over HTTP, one request per image, and one bad request."""
    for image in images:
        for route in ("/v1/score", "/v1/explain"):
            body = json.dumps({"images": [image.reshape(-1).tolist()]}).encode()
            request = urllib.request.Request(
                url + route, data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200
    bad = urllib.request.Request(url + "/v1/score", data=b"{", headers={"Content-Type": "x/y"})
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(bad, timeout=30)


def _produce_records(topics: Any, images: np.ndarray, *, round_name: str) -> None:
    """The images and N_MALFORMED malformed records, keyed by round so that keys stay unique."""
    producer = create_producer(config=topics.config)
    for i, image in enumerate(images):
        key = f"{round_name}-{i}".encode()
        producer.send(topics.config.input_topic, value=image.tobytes(), key=key)
    for i in range(N_MALFORMED):
        key = f"{round_name}-bad{i}".encode()
        producer.send(topics.config.input_topic, value=b"\x01" * 100, key=key)
    producer.flush(timeout=30)
    producer.close()


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def test_dashboard_and_rules_against_a_live_worker(
    kafka_broker: Any,
    trained_bundle: Path,
    fashion_mnist: Any,
    tmp_path: Path,
    prometheus_for: Callable[[str], Prometheus],
) -> None:
    topics = make_topics(kafka_broker, partitions=2, scores=False)
    # `vaewatch serve` too, for the dashboard's HTTP service row (starts while the worker does).
    service = start_serve_process(trained_bundle, log_dir=tmp_path / "logs")
    try:
        # With a shadow (the same bundle) so that the model-lifecycle panels have data too, and
        # exactly_once so that the transaction panels do.
        worker = start_worker(
            model=trained_bundle,
            topics=topics,
            log_dir=tmp_path / "logs",
            timeout_s=60,
            extra_args=[
                "--set",
                f"lifecycle.shadow_model={trained_bundle}",
                "--set",
                "stream.processing_guarantee=exactly_once",
                "--set",
                "stream.transaction_interval_ms=200",
            ],
        )
    except BaseException:
        service.stop()
        raise
    try:
        service.wait_ready()
        target = worker.url.removeprefix("http://")
        prom = prometheus_for(target, service.url.removeprefix("http://"))

        def log_hint() -> str:
            return f"\nworker log:\n{worker.log()[-3000:]}"

        # Prometheus has scraped the worker before any record arrives: every outcome at 0, so
        # the recording rules' windows start from zero.
        def scraped_zero() -> bool:
            result = prom.query(f'vaewatch_records_total{{job="{JOB}"}}')
            return len(result) == 3 and all(float(s["value"][1]) == 0 for s in result)

        _wait("a first scrape of the worker", scraped_zero, 20, log_hint)
        zero_seen = time.monotonic()
        # Requests to the service once Prometheus has seen it, so its rates see them arrive.
        _wait(
            "a first scrape of the service",
            lambda: prom.value(f'up{{job="{SERVE_JOB}"}}') == 1,
            20,
        )
        # Twice: a labelled series is born with its first request, and rate() only counts the
        # increments Prometheus sees after that.
        _request_the_service(service.url, fashion_mnist.test.images[:4])
        _wait(
            "Prometheus to see the service's /v1/score requests",
            lambda: prom.query(
                f'vaewatch_serve_request_duration_seconds_count{{job="{SERVE_JOB}",'
                'route="/v1/score"}'
            ),
            20,
        )
        _request_the_service(service.url, fashion_mnist.test.images[4:8])
        # Labelled counters exist from the start (else rate() misses their first increment: the
        # first dead letters after a restart would never reach the DLQ rate or its alert).
        dead_series = prom.query(f'vaewatch_dead_letters_total{{job="{JOB}"}}')
        assert dead_series and all(float(s["value"][1]) == 0 for s in dead_series), (
            "the worker must create vaewatch_dead_letters_total{reason} for every reason at 0 "
            f"when it starts (rate() never counts a series' first increment); got {dead_series}"
        )
        assert prom.query(f'vaewatch_errors_total{{job="{JOB}"}}'), (
            "the worker must create vaewatch_errors_total{kind} for every kind at 0 when it "
            "starts, so the errors panel and VaewatchErrorsPersisting see the first error"
        )

        # Real records: the first N test images (all classes) and some malformed ones.
        images = np.asarray(fashion_mnist.test.images[:N_IMAGES], dtype=np.uint8)
        images = images.reshape(len(images), 28 * 28)
        _produce_records(topics, images, round_name="first")
        total = N_IMAGES + N_MALFORMED

        def worker_done(total: int = total) -> dict[str, dict[str, float]] | None:
            counters = _worker_counters(worker.metrics_text())
            done = sum(counters.get("vaewatch_records_total", {}).values())
            return counters if done >= total else None

        counters = _wait("the worker to consume every record", worker_done, 60, log_hint)
        records = {k.split("=")[1]: v for k, v in counters["vaewatch_records_total"].items()}
        assert records["invalid"] == N_MALFORMED
        assert records["normal"] + records["anomaly"] == N_IMAGES
        assert records["anomaly"] > 0 and records["normal"] > 0
        expected_rate = records["anomaly"] / (records["normal"] + records["anomaly"])

        # Prometheus sees the final counts, and the rules have been evaluated on them.
        _wait(
            "Prometheus to scrape the final counts",
            lambda: prom.value(f'sum(vaewatch_records_total{{job="{JOB}"}})') == total,
            15,
        )

        # The recording rules equal what the worker counted itself. Both windows still start
        # before the first record (Prometheus saw every counter at 0 under a minute ago), so the
        # ratios are exact; they are polled because rules are evaluated once a second.
        dead = sum(counters.get("vaewatch_dead_letters_total", {}).values())
        assert dead == N_MALFORMED
        expected = {
            f'job:vaewatch_anomaly_rate:ratio_rate1m{{job="{JOB}"}}': expected_rate,
            f'job:vaewatch_anomaly_rate:ratio_rate5m{{job="{JOB}"}}': expected_rate,
            f'job:vaewatch_dead_letter_ratio:rate5m{{job="{JOB}"}}': dead / total,
            f'job:vaewatch_target_fpr:max{{job="{JOB}"}}': counters["vaewatch_target_fpr"][""],
        }
        for expr, want in expected.items():
            seen: list[float | None] = []

            def matches(expr: str = expr, want: float = want, seen: list = seen) -> bool:
                seen.append(prom.value(expr))
                return seen[-1] is not None and abs(seen[-1] - want) < 1e-9

            _wait(
                f"{expr} to equal the worker's {want} ({records})",
                matches,
                15,
                lambda seen=seen: f", Prometheus has {seen[-3:]}",
            )
        assert time.monotonic() - zero_seen < 55, "the windows no longer start at zero"

        # A second round of records and requests, so that every panel's rate window holds fresh
        # increments however long the checks above took (on a slow machine the first round's
        # transactions fell out of the one-minute window and their quantiles read NaN).
        _request_the_service(service.url, fashion_mnist.test.images[8:12])
        _produce_records(topics, images, round_name="second")
        _wait(
            "the worker to consume the second round",
            lambda: worker_done(2 * total),
            60,
            log_hint,
        )
        _wait(
            "Prometheus to scrape the second round's counts",
            lambda: prom.value(f'sum(vaewatch_records_total{{job="{JOB}"}})') == 2 * total,
            15,
        )

        # Every panel query of the dashboard returns data.
        queries = dashboard_queries()
        assert queries
        empty = []
        for query in queries:
            expr = substitute_grafana_variables(query.expr, rate_interval=RATE_INTERVAL)
            result = prom.query(expr)
            if not (result and _finite(result)):
                empty.append(f"{query.panel} [{query.ref}]: {expr} -> {result}")
        assert not empty, "panel queries without data:\n" + "\n".join(empty)

        # The dashboard's variables find this job and worker.
        for name, variable_query in template_queries():
            metric = label_values_metric(variable_query)
            if name == "job":
                assert JOB in prom.label_values("job", metric)
            else:
                values = prom.label_values(name, f'{metric}{{job="{JOB}"}}')
                assert target in values, (name, values)

        # Every rule evaluates without error on the real series.
        def rules_evaluated() -> list[dict[str, Any]] | None:
            rules = prom.rules()
            return rules if all(r.get("health") == "ok" for r in rules) else None

        rules = _wait("every rule to evaluate", rules_evaluated, 10)
        assert len(rules) == sum(
            len(g["rules"]) for g in load_yaml(PROMETHEUS_DIR / "rules.yml")["groups"]
        )

        # On this stream (nine classes of ten are anomalies, ~2% malformed) the anomaly-rate and
        # dead-letter alerts are pending (their `for` has not elapsed); the worker is up.
        def active() -> set[str] | None:
            names = {a["labels"]["alertname"] for a in prom.alerts()}
            wanted = {"VaewatchAnomalyRateHigh", "VaewatchDeadLetterRateHigh"}
            return names if wanted <= names else None

        alerts = _wait("the anomaly-rate and dead-letter alerts", active, 10)
        assert "VaewatchWorkerDown" not in alerts and "VaewatchWorkerAbsent" not in alerts
        assert "VaewatchWorkerNotReady" not in alerts
    finally:
        service.stop()
        code = worker.stop()
    assert code == 0, worker.log()[-3000:]
