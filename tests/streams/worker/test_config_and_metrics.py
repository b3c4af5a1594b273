"""Stream settings from file/env/--set, security pass-through, metrics helpers, health server."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from streams.client_internals import observe_many
from streams.config import StreamConfig
from streams.kafka_io import security_options
from streams.worker.health import MetricsServer
from streams.worker.metrics import WorkerMetrics, score_buckets
from vaewatch.config import ConfigError, load_settings


def test_stream_keys_come_from_environment_and_set_overrides() -> None:
    env = {
        "VAEWATCH_STREAM__BOOTSTRAP_SERVERS": "kafka:9092",
        "VAEWATCH_STREAM__MAX_BATCH_SIZE": "256",
        "VAEWATCH_STREAM__SCORES_TOPIC": "scores",
        "VAEWATCH_STREAM__SASL_PASSWORD": "s3cret",
        "VAEWATCH_METRICS__PORT": "9200",
    }
    settings = load_settings(None, ["stream.max_batch_delay_ms=25"], env=env)
    assert settings.stream.bootstrap_servers == "kafka:9092"
    assert settings.stream.max_batch_size == 256
    assert settings.stream.max_batch_delay_ms == 25
    assert settings.stream.scores_topic == "scores"
    assert settings.metrics.port == 9200
    assert settings.stream.sasl_password is not None
    assert "s3cret" not in repr(settings.stream)


def test_config_yaml_stream_section_is_valid_and_documented_keys_exist() -> None:
    settings = load_settings("config.yaml", [], env={})
    assert settings.stream == StreamConfig()  # the file spells out the defaults
    with pytest.raises(ConfigError, match="max_batch_size"):
        load_settings(None, ["stream.max_batch_size=0"], env={})
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings(None, ["stream.no_such_key=1"], env={})


def test_security_settings_are_passed_through() -> None:
    config = StreamConfig(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="user",
        sasl_password="pw",
        ssl_cafile="/ca.pem",
    )
    options = security_options(config)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "user"
    assert options["sasl_plain_password"] == "pw"
    assert options["ssl_cafile"] == "/ca.pem"
    assert security_options(StreamConfig()) == {"security_protocol": "PLAINTEXT"}


def test_observe_many_matches_one_by_one_observations() -> None:
    values = np.random.default_rng(0).exponential(0.05, 1000)
    values[:3] = [0.005, 0.0, 100.0]  # a bucket edge, zero, beyond the last bucket
    bulk = Histogram("bulk", "x", registry=(r1 := CollectorRegistry()))
    single = Histogram("single", "x", registry=(r2 := CollectorRegistry()))
    observe_many(bulk, values)
    for v in values:
        single.observe(float(v))

    def samples(registry: CollectorRegistry) -> list[tuple[str, float]]:
        return [
            (s.name.split("_", 1)[1], s.labels.get("le"), round(s.value, 6))
            for metric in registry.collect()
            for s in metric.samples
            if not s.name.endswith("_created")
        ]

    assert samples(r1) == samples(r2)


def test_score_buckets_bracket_the_threshold() -> None:
    buckets = score_buckets(np.linspace(10, 20, 100), threshold=19.0)
    assert list(buckets) == sorted(buckets)
    assert 19.0 in buckets and buckets[0] <= 10 and buckets[-1] > 20


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_health_server_serves_metrics_healthz_and_readyz() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry=registry, score_buckets=(1.0, 2.0))
    metrics.threshold.set(1.5)
    ready = {"value": False}
    server = MetricsServer(
        host="127.0.0.1",
        port=0,
        registry=registry,
        readiness=lambda: (ready["value"], {"group_joined": ready["value"]}),
    ).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert _get(f"{base}/healthz") == (200, b"ok\n")
        status, body = _get(f"{base}/readyz")
        assert status == 503 and json.loads(body)["checks"] == {"group_joined": False}
        ready["value"] = True
        status, body = _get(f"{base}/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        status, body = _get(f"{base}/metrics")
        assert status == 200 and b"vaewatch_threshold 1.5" in body
        assert _get(f"{base}/nope")[0] == 404
    finally:
        server.stop()


def test_healthz_answers_503_with_details_when_the_liveness_probe_says_stalled() -> None:
    alive = {"value": True}
    server = MetricsServer(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry(),
        readiness=lambda: (True, {}),
        liveness=lambda: (alive["value"], {"stalled_s": 12.5}),
    ).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert _get(f"{base}/healthz")[0] == 200
        alive["value"] = False
        status, body = _get(f"{base}/healthz")
        assert status == 503 and json.loads(body) == {"alive": False, "stalled_s": 12.5}
    finally:
        server.stop()


class _Clock:
    """An injected clock: the liveness rules are about time passing, not about how fast this
    machine runs the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_worker_state_is_unhealthy_only_when_stalled_with_work_and_unready_when_evicted() -> None:
    from streams.worker.loop import WorkerState

    clock = _Clock()
    state = WorkerState(model_loaded=lambda: True, liveness_timeout_s=5.0, clock=clock)
    state.broker_connected = state.group_joined = True
    state.progressed(has_work=False)
    clock.now += 10
    assert state.liveness()[0] and state.readiness()[0]  # idle is not stalled
    state.progressed(has_work=True)
    clock.now += 4.9
    assert state.liveness()[0]
    clock.now += 0.2
    assert not state.liveness()[0]
    assert state.readiness()[1]["making_progress"] is False
    state.progressed(has_work=True)
    stable = {"value": True}
    state.group_stable = lambda: stable["value"]
    assert state.readiness()[0]
    stable["value"] = False  # the coordinator left the group (poll timeout, eviction)
    assert state.readiness() == (
        False,
        {
            "model_loaded": True,
            "broker_connected": True,
            "authorized": True,
            "group_joined": False,
            "making_progress": True,
        },
    )


def test_a_running_loop_that_stops_turning_is_unhealthy_even_without_work() -> None:
    """Stuck inside a call (a poll that never returns) with nothing in hand: an idle loop
    counts each turn as progress, so the missing turns show; before the loop starts
    (connecting to the broker) nothing is judged."""
    from streams.worker.loop import WorkerState

    clock = _Clock()
    state = WorkerState(model_loaded=lambda: True, liveness_timeout_s=5.0, clock=clock)
    clock.now += 10
    assert state.liveness()[0]  # not started yet
    state.loop_running = True
    state.progressed(has_work=False)  # a turn of the idle loop
    clock.now += 4.9
    assert state.liveness()[0]
    clock.now += 0.2  # no more turns
    alive, details = state.liveness()
    assert not alive and details["stalled_s"] == 5.1
    state.loop_running = False  # the loop ended (draining, stopped)
    assert state.liveness()[0]


def test_config_yaml_names_and_documents_every_stream_and_metrics_key() -> None:
    import yaml

    from streams.config import MetricsConfig

    tree = yaml.safe_load(Path("config.yaml").read_text())
    assert set(tree["stream"]) == set(StreamConfig.model_fields)
    assert set(tree["metrics"]) == set(MetricsConfig.model_fields)


@pytest.mark.parametrize(("cpu_scoring", "expected_s"), [("process", 0.005), ("inline", 0.001)])
def test_the_short_gil_switch_interval_applies_only_where_torch_scores_in_the_worker(
    cpu_scoring: str, expected_s: float
) -> None:
    import sys

    import torch

    from detector import VAE, Calibration, Detector, ModelConfig
    from streams.worker_process import tune_interpreter

    calibration = Calibration(threshold=1.0, target_fpr=0.01, method="conformal", scores=np.ones(3))
    detector = Detector(VAE(ModelConfig(kind="mlp")), calibration, version="x", device="cpu")
    before_s, before_threads = sys.getswitchinterval(), torch.get_num_threads()
    try:
        sys.setswitchinterval(0.005)
        tune_interpreter(StreamConfig(cpu_scoring=cpu_scoring), detector=detector)
        assert sys.getswitchinterval() == pytest.approx(expected_s)
        assert torch.get_num_threads() == 1
    finally:
        sys.setswitchinterval(before_s)
        torch.set_num_threads(before_threads)
