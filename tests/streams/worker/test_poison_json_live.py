"""Poison JSON records against the real embedded broker and a real `vaewatch worker` (issue 9,
finding 5): each ends as a dead letter with its reason, every other record of its batch is
scored, nothing is missing from scores and dead letters, every output is strict JSON, and the
worker stays up."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from streams.codec import MAX_ID_BYTES, MAX_KEY_BYTES
from tests.fixtures_broker import make_topics, start_worker
from tests.streams.kafka_helpers import (
    produce_values,
    read_topic,
    wait_committed,
)

pytestmark = pytest.mark.slow


def _strict_json(value: bytes) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in an output: not JSON")

    return json.loads(value, parse_constant=refuse)


def test_poison_json_records_are_dead_letters_and_their_batch_is_scored(
    kafka_broker, trained_bundle, tmp_path
) -> None:
    topics = make_topics(kafka_broker, codec="json")
    n = 200
    images = np.random.default_rng(0).integers(0, 256, (n, 784), dtype=np.uint8)
    values = [
        json.dumps({"b64": base64.b64encode(row.tobytes()).decode(), "id": f"img-{i}"}).encode()
        for i, row in enumerate(images)
    ]
    keys: list[bytes | None] = [None] * n
    b64 = base64.b64encode(images[0].tobytes()).decode()
    poison = {
        120: (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "bad_json"),
        121: (f'{{"b64": "{b64}", "id": NaN}}'.encode(), "bad_id"),
        122: (json.dumps({"pixels": [True] * 784}).encode(), "bad_schema"),
        123: (json.dumps({"b64": b64, "id": "x" * (MAX_ID_BYTES + 1)}).encode(), "bad_id"),
        124: (f'{{"b64": "{b64}", "b64": "{b64}"}}'.encode(), "bad_schema"),
        125: (f'{{"b64": "{b64}", "id": 1e400}}'.encode(), "bad_id"),
        126: (json.dumps({"pixels": ["x" * 100_000, *[0] * 783]}).encode(), "bad_schema"),
    }
    for offset, (value, _) in poison.items():
        values[offset] = value
    keys[127] = b"k" * (MAX_KEY_BYTES + 1)  # a good value with a key too long for an alert
    expected = {offset: reason for offset, (_, reason) in poison.items()} | {127: "bad_key"}
    produce_values(topics.config, values, keys=keys)

    worker = start_worker(
        model=trained_bundle,
        topics=topics,
        log_dir=tmp_path,
        extra_args=["--set", "stream.max_batch_size=100"],
    )
    try:
        dead = read_topic(topics.config, topics.config.dlq_topic, until=len(expected))
        scores = read_topic(
            topics.config, topics.config.scores_topic, until=n - len(expected), timeout_s=60
        )
        assert wait_committed(topics.config, n, timeout_s=30) == n
        assert worker.process.poll() is None, worker.log()
        alerts = read_topic(topics.config, topics.config.alert_topic, until=0, timeout_s=2)
    finally:
        assert worker.stop() == 0, worker.log()

    letters = {
        int(dict(r.headers)["vaewatch.source.offset"]): dict(r.headers)["vaewatch.error"].decode()
        for r in dead
    }
    assert letters == expected
    scored = {s["offset"]: s for s in map(_strict_json, (r.value for r in scores))}
    assert set(scored) == set(range(n)) - set(expected)  # nothing missing, nothing twice
    assert all(scored[i]["id"] == f"img-{i}" for i in scored)
    for alert in alerts:
        _strict_json(alert.value)
