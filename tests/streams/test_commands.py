"""`vaewatch produce` and `vaewatch demo` as a user runs them, against real brokers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.fixtures_broker import make_topics
from tests.streams.kafka_helpers import read_topic

pytestmark = pytest.mark.slow


def _vaewatch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vaewatch.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_produce_replays_labelled_images_with_headers(kafka_broker, fashion_mnist) -> None:
    topics = make_topics(kafka_broker)
    done = _vaewatch(
        "--set",
        f"stream.bootstrap_servers={kafka_broker.bootstrap_servers}",
        "--set",
        "data.normal_classes=[0]",
        "produce",
        "--topic",
        topics.config.input_topic,
        "--count",
        "40",
        "--codec",
        "json",
        "--rate",
        "400",
    )
    assert done.returncode == 0, done.stderr
    assert "sent 40 records" in done.stdout
    records = read_topic(topics.config, topics.config.input_topic, until=40, timeout_s=10)
    assert len(records) == 40
    labels = fashion_mnist.test.labels
    for i, record in enumerate(sorted(records, key=lambda r: r.offset)):
        headers = dict(record.headers)
        assert headers["label"] == str(labels[i]).encode()  # dataset order by default
        assert headers["anomaly"] == (b"0" if labels[i] == 0 else b"1")
        assert json.loads(record.value)["id"] == headers["id"].decode() == f"test-{i}"


@pytest.mark.parametrize(
    ("engine", "framed"),
    [("tansu", False), ("kafka", False), ("tansu", True)],
    ids=["tansu", "kafka", "tansu-framed-outputs"],
)
def test_demo_runs_end_to_end_and_stops_cleanly(trained_bundle, engine: str, framed: bool) -> None:
    # framed: a config that frames the outputs; the demo's tally still reads one score a record
    formats = ["--set", "stream.scores_format=batch", "--set", "stream.alert_format=batch"]
    done = _vaewatch(
        "--set",
        "detector.device=cpu",
        *(formats if framed else []),
        "demo",
        "--engine",
        engine,
        "--model",
        str(trained_bundle),
        "--count",
        "600",
        "--rate",
        "0",
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done: 600 of 600 records scored" in done.stdout
    assert "dead letters 3" in done.stdout  # the three malformed records, counted by the worker
    assert "/metrics" in done.stdout and "precision" in done.stdout


def test_produce_from_a_folder_sends_each_image_file_as_it_is(kafka_broker, tmp_path) -> None:
    topics = make_topics(kafka_broker, codec="image")
    files = {}
    rng = np.random.default_rng(0)
    for name, size in (("tshirt/a.png", 28), ("tshirt/deep/b.jpg", 64), ("sneaker/c.webp", 40)):
        path = tmp_path / "photos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
        files[name] = path.read_bytes()
    (tmp_path / "photos" / "sneaker" / "notes.txt").write_text("not an image")
    big = tmp_path / "photos" / "sneaker" / "huge.png"
    Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8)).save(big)
    done = _vaewatch(
        "--set", f"stream.bootstrap_servers={kafka_broker.bootstrap_servers}",
        "--set", f"stream.input_topic={topics.config.input_topic}",
        "--set", "stream.max_request_size=60000",
        "--set", "data.normal_classes=[tshirt]",
        "produce", "--from", str(tmp_path / "photos"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "sent 3 records" in done.stdout
    assert "huge.png: over stream.max_request_size" in done.stderr
    records = read_topic(topics.config, topics.config.input_topic, until=3, timeout_s=10)
    sent = {dict(r.headers)["id"].decode(): (r.value, dict(r.headers)) for r in records}
    assert set(sent) == set(files)
    for name, (value, headers) in sent.items():
        assert value == files[name]
        assert headers["label"].decode() == name.split("/")[0]
        assert headers["anomaly"] == (b"0" if name.startswith("tshirt") else b"1")
