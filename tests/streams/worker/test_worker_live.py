"""The worker against the real embedded broker: nothing lost, scores match the detector,
malformed records in the DLQ, metrics and health endpoints, SIGTERM drain, two workers."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from detector import Detector
from streams.codec import encode_images
from streams.lifecycle.metrics import LifecycleMetrics
from streams.worker.metrics import WorkerMetrics
from tests.fixtures_broker import make_topics, start_worker
from tests.fixtures_model import CPU
from tests.streams.kafka_helpers import (
    committed_offsets,
    end_offsets,
    open_reader,
    produce_values,
    read_json,
    read_topic,
    record_count,
)

pytestmark = pytest.mark.slow

N_IMAGES = 2000
ALERT_FIELDS = {
    "topic",
    "partition",
    "offset",
    "key",
    "id",
    "timestamp_ms",
    "score",
    "threshold",
    "p_value",
    "model_version",
    "scored_at_ms",
    "anomaly",
}


@pytest.fixture(scope="module")
def scored_run(kafka_broker, trained_bundle, fashion_mnist, tmp_path_factory):
    """One worker scores 2,000 real test images (2 partitions); the test functions check it."""
    topics = make_topics(kafka_broker, partitions=2)
    images = fashion_mnist.test.images[:N_IMAGES]
    headers = [[("id", f"img-{i}".encode()), ("label", b"x")] for i in range(N_IMAGES)]
    keys = [f"k{i}".encode() for i in range(N_IMAGES)]
    produce_values(
        topics.config,
        encode_images(images, codec="raw"),
        partitions=2,
        headers=headers,
        keys=keys,
    )
    worker = start_worker(
        model=trained_bundle, topics=topics, log_dir=tmp_path_factory.mktemp("worker")
    )
    scores = read_json(read_topic(topics.config, topics.config.scores_topic, until=N_IMAGES))
    alerts_raw = read_topic(topics.config, topics.config.alert_topic, until=1, timeout_s=5)
    metrics_text = worker.metrics_text()
    yield {
        "topics": topics,
        "worker": worker,
        "images": images,
        "scores": scores,
        "alerts": alerts_raw,
        "metrics": metrics_text,
    }
    if worker.process.poll() is None:
        worker.stop()


def _by_position(results: list[dict]) -> dict[tuple[int, int], dict]:
    return {(r["partition"], r["offset"]): r for r in results}


def test_every_record_is_scored_at_least_once(scored_run) -> None:
    positions = _by_position(scored_run["scores"])
    # produce_values sent record i to partition i % 2, at offset i // 2.
    expected = {(i % 2, i // 2) for i in range(N_IMAGES)}
    assert set(positions) == expected


def test_scores_and_alerts_match_the_detector_offline(scored_run, trained_bundle) -> None:
    detector = Detector.from_bundle(trained_bundle, CPU)
    offline = detector.score(scored_run["images"])
    positions = _by_position(scored_run["scores"])
    online = np.array([positions[(i % 2, i // 2)]["score"] for i in range(N_IMAGES)])
    np.testing.assert_allclose(online, offline.scores, rtol=1e-4, atol=1e-3)
    flags = np.array([positions[(i % 2, i // 2)]["anomaly"] for i in range(N_IMAGES)])
    np.testing.assert_array_equal(flags, offline.anomalous)
    alerts = scored_run["alerts"]
    expected = {(i % 2, i // 2) for i in np.flatnonzero(offline.anomalous).tolist()}
    assert 0 < len(expected) < N_IMAGES
    assert {
        (json.loads(a.value)["partition"], json.loads(a.value)["offset"]) for a in alerts
    } == expected
    for record in alerts:
        alert = json.loads(record.value)
        assert set(alert) >= ALERT_FIELDS
        assert alert["anomaly"] is True and alert["score"] > alert["threshold"]
        assert alert["threshold"] == pytest.approx(detector.threshold)
        assert alert["model_version"] == detector.version
        i = alert["offset"] * 2 + alert["partition"]
        assert record.key == f"{alert['topic']}/{alert['partition']}/{alert['offset']}".encode()
        assert alert["key"] == f"k{i}" and alert["id"] == f"img-{i}"
        assert ("label", b"x") in record.headers  # input headers pass through
        assert 0 < alert["p_value"] <= 1 and alert["scored_at_ms"] >= alert["timestamp_ms"]


def test_metrics_endpoint_serves_the_documented_metrics(scored_run) -> None:
    text = scored_run["metrics"]
    # Every metric WorkerMetrics declares (the names the dashboards and alert rules use).
    registry = CollectorRegistry()
    WorkerMetrics(registry=registry, score_buckets=(1.0,))
    LifecycleMetrics(registry=registry)
    names = {metric.name for metric in registry.collect()}
    assert len(names) >= 13
    for name in names:
        assert f"# TYPE {name}" in text or f"# TYPE {name}_total" in text, name
    assert 'vaewatch_records_total{outcome="normal"}' in text
    lines = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    scored = float(lines['vaewatch_records_total{outcome="normal"}']) + float(
        lines['vaewatch_records_total{outcome="anomaly"}']
    )
    assert scored >= N_IMAGES
    assert float(lines["vaewatch_alerts_published_total"]) == len(scored_run["alerts"])
    assert float(lines["vaewatch_score_count"]) >= N_IMAGES
    assert float(lines["vaewatch_end_to_end_latency_seconds_count"]) >= N_IMAGES
    assert float(lines["vaewatch_ready"]) == 1.0
    topic = scored_run["topics"].config.input_topic
    assert f'vaewatch_consumer_lag_records{{partition="0",topic="{topic}"}}' in text
    url = scored_run["worker"].url
    with urllib.request.urlopen(f"{url}/healthz") as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{url}/readyz") as response:
        assert json.loads(response.read())["ready"] is True


def test_sigterm_after_the_backlog_commits_everything(scored_run) -> None:
    worker, config = scored_run["worker"], scored_run["topics"].config
    assert worker.stop() == 0, worker.log()
    assert committed_offsets(config, partitions=2) == end_offsets(config, partitions=2)


def test_malformed_records_go_to_the_dlq_with_reasons(
    kafka_broker, trained_bundle, fashion_mnist, tmp_path
) -> None:
    topics = make_topics(kafka_broker, codec="json")
    good = encode_images(fashion_mnist.test.images[:3], codec="json", ids=["a", "b", "c"])
    nan = ('{"pixels": [' + ",".join(["NaN"] + ["0"] * 783) + "]}").encode()
    bad = {
        b"{broken": "bad_json",
        json.dumps({"pixels": [0] * 783}).encode(): "wrong_length",
        json.dumps({"pixels": [300] * 784}).encode(): "out_of_range",
        nan: "not_finite",
        b"[1, 2]": "bad_schema",
    }
    values = [good[0], *bad, good[1], good[2]]
    produce_values(topics.config, values, headers=[[("trace", b"t1")]] * len(values))
    worker = start_worker(model=trained_bundle, topics=topics, log_dir=tmp_path)
    try:
        dead = read_topic(topics.config, topics.config.dlq_topic, until=len(bad))
        scored = read_json(read_topic(topics.config, topics.config.scores_topic, until=3))
    finally:
        assert worker.stop() == 0
    assert sorted(s["id"] for s in scored) == ["a", "b", "c"]
    assert len(dead) == len(bad)
    for record in dead:
        headers = dict(record.headers)
        assert headers["vaewatch.error"].decode() == bad[record.value]
        assert headers["vaewatch.source.topic"].decode() == topics.config.input_topic
        assert headers["vaewatch.source.partition"] == b"0"
        offset = int(headers["vaewatch.source.offset"])
        assert values[offset] == record.value  # unchanged, and the offset names its source
        assert headers["trace"] == b"t1" and headers["vaewatch.error.detail"]


def test_sigterm_mid_backlog_drains_and_a_restart_loses_nothing(
    kafka_broker, trained_bundle, tmp_path
) -> None:
    topics = make_topics(kafka_broker, max_batch_size=256)
    n = 10000
    images = np.random.default_rng(1).integers(0, 256, (n, 784), dtype=np.uint8)
    produce_values(topics.config, encode_images(images, codec="raw"))
    first = start_worker(model=trained_bundle, topics=topics, log_dir=tmp_path)
    read_topic(topics.config, topics.config.scores_topic, until=500)
    assert first.stop() == 0, first.log()
    committed = committed_offsets(topics.config)[0]
    assert committed is not None and committed > 0
    done = {
        r["offset"]
        for r in read_json(
            read_topic(topics.config, topics.config.scores_topic, until=committed, timeout_s=10)
        )
    }
    assert set(range(committed)) <= done  # nothing committed without its scores acknowledged
    second = start_worker(model=trained_bundle, topics=topics, log_dir=tmp_path)
    results = read_json(read_topic(topics.config, topics.config.scores_topic, until=n))
    assert second.stop() == 0, second.log()
    assert {r["offset"] for r in results} == set(range(n))
    assert committed_offsets(topics.config) == {0: n}


def test_two_workers_share_a_four_partition_topic(
    kafka_broker, trained_bundle, fashion_mnist, tmp_path
) -> None:
    topics = make_topics(kafka_broker, partitions=4)
    first = start_worker(model=trained_bundle, topics=topics, log_dir=tmp_path)
    second = start_worker(model=trained_bundle, topics=topics, log_dir=tmp_path)
    n = 4000
    images = fashion_mnist.test.images[:n]
    produce_values(topics.config, encode_images(images, codec="raw"), partitions=4)
    results = read_json(read_topic(topics.config, topics.config.scores_topic, until=n))
    counts = []
    for worker in (first, second):
        lines = [
            line
            for line in worker.metrics_text().splitlines()
            if line.startswith("vaewatch_records_total{")
        ]
        counts.append(sum(float(line.rsplit(" ", 1)[1]) for line in lines))
    assert first.stop() == 0 and second.stop() == 0
    assert {(r["partition"], r["offset"]) for r in results} == {(i % 4, i // 4) for i in range(n)}
    assert all(c > 0 for c in counts), counts  # both took part
    assert committed_offsets(topics.config, partitions=4) == end_offsets(
        topics.config, partitions=4
    )


def test_worker_waits_for_an_unreachable_broker_and_then_consumes(
    trained_bundle, fashion_mnist, tmp_path
) -> None:
    from streams.brokers.local import EmbeddedBroker, free_port
    from streams.config import StreamConfig
    from streams.kafka_io import ensure_topics
    from tests.fixtures_broker import StreamTopics, wait_alive, wait_ready

    port = free_port()
    config = StreamConfig(
        bootstrap_servers=f"127.0.0.1:{port}",
        input_topic="late.images",
        alert_topic="late.alerts",
        scores_topic="late.scores",
        dlq_topic="late.dlq",
        group_id="late",
        bootstrap_timeout_ms=1000,
    )
    worker = start_worker(
        model=trained_bundle,
        topics=StreamTopics(config=config),
        log_dir=tmp_path,
        extra_args=["--set", "stream.bootstrap_timeout_ms=1000"],
        wait=False,
    )
    try:
        # A cold process takes seconds to import torch and load the model before it serves
        # HTTP at all; only then is "not ready because of the broker" what /readyz should say.
        wait_alive(worker.url, process=worker.process)
        with pytest.raises(TimeoutError, match="broker_connected"):
            wait_ready(worker.url, timeout_s=4, process=worker.process)
        with urllib.request.urlopen(f"{worker.url}/healthz") as response:
            assert response.status == 200  # alive while not ready
        with EmbeddedBroker(port=port):
            ensure_topics(
                config=config, topics=["late.images", "late.alerts", "late.scores", "late.dlq"]
            )
            wait_ready(worker.url, timeout_s=30, process=worker.process)
            produce_values(config, encode_images(fashion_mnist.test.images[:50], codec="raw"))
            assert len(read_topic(config, "late.scores", until=50)) >= 50
            assert worker.stop() == 0, worker.log()
    finally:
        if worker.process.poll() is None:
            worker.process.kill()


def test_batch_framed_alerts_and_scores_carry_every_record_as_json_lines(
    kafka_broker, trained_bundle, fashion_mnist, tmp_path
) -> None:
    topics = make_topics(kafka_broker)
    n = 300
    produce_values(topics.config, encode_images(fashion_mnist.test.images[:n], codec="raw"))
    framed = ["--set", "stream.scores_format=batch", "--set", "stream.alert_format=batch"]
    worker = start_worker(model=trained_bundle, topics=topics, log_dir=tmp_path, extra_args=framed)
    try:
        messages = read_topic(topics.config, topics.config.scores_topic, until=n)
    finally:
        assert worker.stop() == 0
    lines = [json.loads(line) for m in messages for line in m.value.split(b"\n")]
    assert {x["offset"] for x in lines} == set(range(n))
    anomalies = {x["offset"] for x in lines if x["anomaly"]}
    assert 0 < len(anomalies) < n  # the test set's other classes alert, most of its own do not
    alert_messages = read_topic(topics.config, topics.config.alert_topic, until=len(anomalies))
    alerts = [json.loads(line) for m in alert_messages for line in m.value.split(b"\n")]
    assert sorted(x["offset"] for x in alerts) == sorted(anomalies)
    assert len(alert_messages) < len(anomalies)  # frames, not one message per alert
    for message in messages + alert_messages:
        first, last = message.key.decode().rsplit("/", 1)[1].split("-")
        offsets = [json.loads(line)["offset"] for line in message.value.split(b"\n")]
        assert (offsets[0], offsets[-1]) == (int(first), int(last))
        assert dict(message.headers)["vaewatch.format"] == b"jsonl"


def _scoring_process_pid(worker_pid: int) -> int:
    """The worker's spawned scoring child (not multiprocessing's resource tracker)."""
    for child in Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"spawn_main" in cmdline:
            return int(child)
    raise AssertionError(f"worker {worker_pid} has no scoring process")


def test_a_killed_scoring_process_is_replaced_and_loses_nothing(
    kafka_broker, trained_bundle, tmp_path
) -> None:
    topics = make_topics(kafka_broker, max_batch_size=128)
    n = 6000
    images = np.random.default_rng(2).integers(0, 256, (n, 784), dtype=np.uint8)
    produce_values(topics.config, encode_images(images, codec="raw"))
    # Killed while most records are still to be scored (a dead idle child is found only by the
    # next batch): the reader connects first and waits for the 300th score, not the worker's
    # join, as in the frozen-broker tests of test_worker_faults.py.
    reader = open_reader(topics.config, topics.config.scores_topic)
    worker = start_worker(model=trained_bundle, topics=topics, log_dir=tmp_path, wait=False)
    try:
        read_topic(topics.config, topics.config.scores_topic, until=300, reader=reader)
        os.kill(_scoring_process_pid(worker.process.pid), signal.SIGKILL)
        results = read_json(read_topic(topics.config, topics.config.scores_topic, until=n))
        text = worker.metrics_text()
    finally:
        assert worker.stop() == 0, worker.log()
    assert {r["offset"] for r in results} == set(range(n))
    assert record_count(topics.config, topics.config.dlq_topic) == 0
    assert 'vaewatch_errors_total{kind="scoring"} 1.0' in text
    assert "restarting the scoring process" in worker.log()
    assert committed_offsets(topics.config) == {0: n}
