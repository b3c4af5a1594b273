"""The console's alert follower (serve/alerts.py) on a real Kafka: it reads alerts in both forms
the worker writes (one message per alert, and frames of JSON Lines: docs/wire-contract.md) and
outlives a message that holds no alert."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np

from serve.alerts import AlertFollower
from streams.worker.publish import FRAME_HEADER
from tests.fixtures_broker import make_topics
from tests.streams.kafka_helpers import produce_values, raw_images


class _Cards:
    """Stands in for the hub: the cards, in order, and an event per card."""

    def __init__(self) -> None:
        self.cards: list[dict[str, Any]] = []
        self.added = threading.Condition()

    def publish_threadsafe(self, card: dict[str, Any]) -> None:
        with self.added:
            self.cards.append(card)
            self.added.notify_all()

    def wait_for(self, n: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        with self.added:
            while len(self.cards) < n and self.added.wait(max(deadline - time.monotonic(), 0)):
                pass
            return list(self.cards)


def _alert(topic: str, offset: int) -> bytes:
    return json.dumps(
        {"topic": topic, "partition": 0, "offset": offset, "score": 9.5, "anomaly": True}
    ).encode()


def test_the_follower_shows_framed_and_single_alerts_and_skips_a_tombstone(
    kafka_broker: Any,
) -> None:
    topics = make_topics(kafka_broker)
    config = topics.config
    produce_values(config, raw_images(3))
    source = config.input_topic
    frame = _alert(source, 0) + b"\n" + _alert(source, 1)
    produce_values(
        config,
        [frame, None, _alert(source, 2)],  # type: ignore[list-item]
        topic=config.alert_topic,
        keys=[f"{source}/0/0-1".encode(), b"gone", f"{source}/0/2".encode()],
        headers=[[FRAME_HEADER], [], []],
    )
    cards = _Cards()
    explained: list[tuple[int, str | None]] = []

    def explain(image: np.ndarray, *, model_version: str | None = None) -> dict[str, Any]:
        explained.append((int(image.size), model_version))
        return {"map_by": "test"}

    follower = AlertFollower(
        stream=config,
        hub=cards,  # type: ignore[arg-type]
        explain=explain,
        replay_recent=10,
    )
    follower.start()
    try:
        shown = cards.wait_for(3)
    finally:
        follower.stop()
    assert [card["offset"] for card in shown] == [0, 1, 2]
    assert all("image_error" not in card and card["map_by"] == "test" for card in shown), shown
    assert explained == [(784, None)] * 3  # each image read back from its source record
