"""The embedded Tansu broker, vaewatch's light default (`vaewatch broker`, `vaewatch demo`),
stays tested whichever broker the live suite runs on: one worker end to end on it. The demo's
own test (tests/streams/test_commands.py) starts Tansu, its default engine, too."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.codec import encode_images
from tests.fixtures_broker import make_topics, start_worker
from tests.streams.kafka_helpers import committed_offsets, produce_values, read_json, read_topic

pytestmark = pytest.mark.slow


def test_a_worker_on_tansu_scores_and_commits_every_record(
    tansu_broker, trained_bundle: Path, fashion_mnist, tmp_path: Path
) -> None:
    topics = make_topics(tansu_broker, partitions=2)
    produce_values(
        topics.config, encode_images(fashion_mnist.test.images[:300], codec="raw"), partitions=2
    )
    worker = start_worker(model=trained_bundle, topics=topics, log_dir=tmp_path)
    scores = read_json(read_topic(topics.config, topics.config.scores_topic, until=300))
    assert worker.stop() == 0
    assert {(s["partition"], s["offset"]) for s in scores} == {
        (p, o) for p in range(2) for o in range(150)
    }
    assert committed_offsets(topics.config, partitions=2) == {0: 150, 1: 150}
