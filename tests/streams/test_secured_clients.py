"""Every vaewatch Kafka client through both secured listeners of a real Apache Kafka with an
authorizer (tests/fixtures_secured_kafka.py): SASL_SSL with SCRAM-SHA-512, and mutual TLS. Each
client's principal holds exactly the ACLs `vaewatch acls` lists for it, and nothing else."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from streams.acls import client_acls
from streams.kafka_io import ensure_topics
from streams.topic_range import parse_topic_range, read_topic_range
from tests.fixtures_broker import start_worker
from tests.fixtures_secured_kafka import (
    WORKER,
    WORKER_PASSWORD,
    SecuredKafka,
    first_alert_card,
    use_stream_env,
)
from tests.streams.kafka_helpers import produce_values, raw_images, read_json, read_topic

pytestmark = pytest.mark.slow

LISTENERS = ["sasl", "mtls"]
PRINCIPAL = f"User:{WORKER}"
N = 300


def _worker_config(secured: SecuredKafka, topics, listener: str, **overrides):
    """The worker principal's settings on `listener`, with the test's topics and group."""
    names = ("input_topic", "alert_topic", "scores_topic", "dlq_topic", "group_id")
    return secured.config(listener, **{n: getattr(topics.config, n) for n in names}, **overrides)


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
@pytest.mark.parametrize("listener", LISTENERS)
def test_the_worker_scores_every_record_with_exactly_its_acls(
    secured_kafka, trained_bundle, tmp_path, monkeypatch, listener, guarantee
) -> None:
    topics = secured_kafka.topics()
    config = _worker_config(secured_kafka, topics, listener, processing_guarantee=guarantee)
    secured_kafka.grant(client_acls("worker", config, principal=PRINCIPAL))
    produce_values(topics.config, raw_images(N))
    use_stream_env(monkeypatch, config)
    worker = start_worker(
        model=trained_bundle,
        topics=topics,
        log_dir=tmp_path,
        extra_args=[
            "--set",
            f"stream.bootstrap_servers={config.bootstrap_servers}",
            "--set",
            f"stream.processing_guarantee={guarantee}",
        ],
        timeout_s=60,
    )
    try:
        scores = read_topic(
            topics.config,
            topics.config.scores_topic,
            until=N,
            isolation_level="read_committed",
        )
    finally:
        assert worker.stop() == 0, worker.log()
    offsets = Counter(s["offset"] for s in read_json(scores))
    assert sorted(offsets) == list(range(N)), worker.log()
    if guarantee == "exactly_once":
        assert set(offsets.values()) == {1}
    assert WORKER_PASSWORD not in worker.log()


@pytest.mark.parametrize("listener", LISTENERS)
def test_vaewatch_produce_creates_its_topic_and_sends(
    secured_kafka, fashion_mnist, tmp_path, monkeypatch, listener
) -> None:
    """`vaewatch produce --partitions 2` creates the topic (CREATE is the only other ACL it
    needs), and every record it says it sent is there."""
    topics = secured_kafka.topics()
    target = f"{topics.config.input_topic}.produced"
    config = _worker_config(secured_kafka, topics, listener)
    secured_kafka.grant(
        client_acls("produce", config, principal=PRINCIPAL, topic=target, create_topics=True)
    )
    use_stream_env(monkeypatch, config)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vaewatch.cli",
            "--set",
            f"stream.bootstrap_servers={config.bootstrap_servers}",
            "produce",
            "--topic",
            target,
            "--count",
            "200",
            "--partitions",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "sent 200 records" in done.stdout
    records = read_topic(topics.config, target, until=200)
    assert len(records) == 200 and {r.partition for r in records} == {0, 1}
    assert WORKER_PASSWORD not in done.stdout + done.stderr


@pytest.mark.parametrize("listener", LISTENERS)
def test_recalibration_reads_a_topic_range(secured_kafka, listener) -> None:
    topics = secured_kafka.topics()
    config = _worker_config(secured_kafka, topics, listener)
    secured_kafka.grant(client_acls("recalibrate", config, principal=PRINCIPAL))
    values = raw_images(50, seed=3)
    produce_values(topics.config, values)
    source = parse_topic_range(f"kafka:{config.input_topic}:0:10-40")
    read = read_topic_range(source, config=config, timeout_s=30)
    assert read.n_records == 30 and read.offsets == {0: (10, 40)}
    expected = np.frombuffer(b"".join(values[10:40]), dtype=np.uint8).reshape(30, 784)
    assert np.array_equal(read.images, expected)


@pytest.mark.parametrize("listener", LISTENERS)
def test_topic_creation_with_create_acls(secured_kafka, listener) -> None:
    """ensure_topics, which `vaewatch produce --partitions` and `vaewatch broker` use, creates
    topics as a principal that holds CREATE on them and waits for their leaders."""
    topics = secured_kafka.topics()
    config = _worker_config(secured_kafka, topics, listener)
    wanted = [f"{config.input_topic}.new{i}" for i in range(2)]
    secured_kafka.grant(
        spec
        for name in wanted
        for spec in client_acls(
            "produce", config, principal=PRINCIPAL, topic=name, create_topics=True
        )
    )
    ensure_topics(config=config, topics=wanted, partitions=3, timeout_s=20)
    admin = secured_kafka.admin()
    try:
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(wanted)}
    finally:
        admin.close()
    assert described == dict.fromkeys(wanted, 3)


@pytest.mark.parametrize("listener", LISTENERS)
def test_the_console_follows_alerts_and_reads_their_images_back(
    secured_kafka, trained_bundle, listener
) -> None:
    """`vaewatch serve` with live alerts: its principal may read the alert topic and the input
    topic (to show each alert's image) and nothing else; the card carries the image's
    reconstruction, so the source record was read back through the secured listener."""
    topics = secured_kafka.topics()
    config = _worker_config(secured_kafka, topics, listener)
    secured_kafka.grant(client_acls("serve", config, principal=PRINCIPAL))
    produce_values(topics.config, raw_images(1, seed=5))
    card = first_alert_card(trained_bundle, config=config, producer_config=topics.config)
    assert "image_error" not in card, card
    assert card["offset"] == 0 and card.get("reconstruction_png"), sorted(card)
