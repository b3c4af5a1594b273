"""Outputs that Apache Kafka refuses never halt a partition (issue 27), in both guarantees: a
dead letter too large for its topic (the issue's 20,000-byte record against a 4,096-byte
dead-letter topic), an alert too large for its topic, batch-framed scores too large for theirs,
and a dead letter with a null key for a compacted topic (timestamps:
test_refused_timestamps_live.py; a topic an ACL denies: test_refused_outputs.py). Every other
record of the partition is scored, alerted and committed, the refused record's outputs
are replaced by its dead letter (or a smaller copy of it), and under exactly_once a
read_committed reader sees every output once, after one abort per refusal at most."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from streams.codec import encode_images
from tests.fixtures_broker import StreamTopics, make_topics, metric_value, start_worker
from tests.streams.kafka_helpers import (
    LENIENT_INPUT_TOPIC,
    produce_values,
    raw_images,
    read_json,
    read_topic,
    wait_committed,
)

pytestmark = pytest.mark.slow

GUARANTEES = ["at_least_once", "exactly_once"]
COMMITTED = "read_committed"


def _settings(guarantee: str, *more: str) -> list[str]:
    args = ["--set", f"stream.processing_guarantee={guarantee}"]
    for setting in ("stream.max_batch_size=100", *more):
        args += ["--set", setting]
    return args


def _refused(text: str, output: str, reason: str) -> float:
    return metric_value(
        text, f'vaewatch_outputs_refused_total{{output="{output}",reason="{reason}"}}'
    )


def _aborts(text: str) -> float:
    return metric_value(text, 'vaewatch_transactions_total{outcome="aborted"}')


def _letters(topics: StreamTopics, until: int) -> dict[int, list]:
    """Dead letters (read_committed) by source offset."""
    config = topics.config
    letters: dict[int, list] = {}
    for record in read_topic(config, config.dlq_topic, until=until, isolation_level=COMMITTED):
        letters.setdefault(int(dict(record.headers)["vaewatch.source.offset"]), []).append(record)
    return letters


def _scored(topics: StreamTopics, until: int) -> Counter:
    """Score lines (read_committed) per input offset, framed or not."""
    config = topics.config
    records = read_topic(config, config.scores_topic, until=until, isolation_level=COMMITTED)
    return Counter(json.loads(line)["offset"] for r in records for line in r.value.splitlines())


def _check_scores(scored: Counter, expected: set[int], guarantee: str) -> None:
    assert set(scored) == expected, sorted(set(scored) ^ expected)[:10]
    if guarantee == "exactly_once":
        assert [o for o, k in scored.items() if k > 1] == []


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_dead_letter_too_large_for_its_topic_halts_nothing(
    guarantee: str, kafka_broker, trained_bundle: Path, tmp_path: Path
) -> None:
    """The issue's scenario, shorter: one 20,000-byte malformed record in the middle, the
    dead-letter topic created with max.message.bytes=4096. Before: at_least_once exited 1 (the
    idempotent producer died of the refusal, with the batch's alerts), exactly_once aborted the
    same transaction for ever."""
    topics = make_topics(kafka_broker, output_configs={"dlq_topic": {"max.message.bytes": "4096"}})
    config = topics.config
    n, bad = 1200, 600
    values = raw_images(n, seed=27)
    values[bad] = b"\x01" * 20_000
    produce_values(config, values)
    worker = start_worker(
        model=trained_bundle, topics=topics, log_dir=tmp_path, extra_args=_settings(guarantee)
    )
    try:
        assert wait_committed(config, n, timeout_s=120) == n, worker.log()[-3000:]
        text = worker.metrics_text()
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    _check_scores(_scored(topics, n - 1), set(range(n)) - {bad}, guarantee)
    letters = _letters(topics, 1)
    assert list(letters) == [bad] and len(letters[bad]) == 1
    (letter,) = letters[bad]
    headers = dict(letter.headers)
    assert headers["vaewatch.error"] == b"unsendable"
    assert headers["vaewatch.original.size"] == b"20000"
    assert letter.value == b""  # bare: the input topic keeps the value at the coordinates
    assert headers["vaewatch.error.detail"].startswith(b"wrong_length, then MessageSizeTooLarge")
    assert _refused(text, "dead_letter", "too_large") == 1
    assert metric_value(text, 'vaewatch_dead_letters_total{reason="unsendable"}') == 1
    assert metric_value(text, 'vaewatch_dead_letters_total{reason="wrong_length"}') == 0
    line = f"{config.input_topic}/0/{bad}: its dead letter to {config.dlq_topic}"
    assert worker.log().count(line) == 1, worker.log()[-3000:]
    if guarantee == "exactly_once":
        assert _aborts(text) == 1


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_alerts_scores_and_keyless_dead_letters_the_topics_refuse_halt_nothing(
    guarantee: str, kafka_broker, trained_bundle: Path, tmp_path: Path
) -> None:
    """Siblings in one run: an alert over its topic's 2,048 bytes (a 2,500-byte input header
    rides along), batch-framed scores over their topic's 4,096, and a keyless dead letter for a
    compacted dead-letter topic (INVALID_RECORD)."""
    topics = make_topics(
        kafka_broker,
        input_configs=LENIENT_INPUT_TOPIC,
        output_configs={
            "alert_topic": {"max.message.bytes": "2048"},
            "scores_topic": {"max.message.bytes": "4096"},
            "dlq_topic": {"cleanup.policy": "compact"},
        },
    )
    config = topics.config
    n = 600
    images = np.random.default_rng(4).integers(0, 256, (n, 784), dtype=np.uint8)
    white = [100, 200, 300, 400]
    images[white] = 255  # anomalies for a T-shirt model: alerts as well as scores
    values = encode_images(images, codec="raw")
    headers: list[list[tuple[str, bytes]]] = [[] for _ in range(n)]
    keys: list[bytes | None] = [None] * n
    headers[200] = [("blob", b"b" * 2500)]
    values[250] = values[260] = b"short"
    keys[260] = b"k"
    produce_values(config, values, headers=headers, keys=keys)
    worker = start_worker(
        model=trained_bundle,
        topics=topics,
        log_dir=tmp_path,
        extra_args=_settings(guarantee, 'stream.scores_format="batch"'),
    )
    try:
        assert wait_committed(config, n, timeout_s=120) == n, worker.log()[-3000:]
        text = worker.metrics_text()
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    _check_scores(_scored(topics, n - 2), set(range(n)) - {250, 260}, guarantee)
    letters = _letters(topics, 3)
    assert {o: len(c) for o, c in letters.items()} == {200: 1, 250: 1, 260: 1}
    copy = dict(letters[200][0].headers)
    assert (
        copy["vaewatch.error"] == b"unsendable"
        and b"MessageSizeTooLarge" in (copy["vaewatch.error.detail"])
    )
    assert letters[200][0].value == values[200] and copy["blob"] == b"b" * 2500
    keyless = dict(letters[250][0].headers)
    assert keyless["vaewatch.error.detail"].startswith(b"wrong_length, then InvalidRecord")
    assert letters[250][0].key == f"{config.input_topic}/0/250".encode()
    assert dict(letters[260][0].headers)["vaewatch.error"] == b"wrong_length"
    assert letters[260][0].key == b"k"
    alerts = read_json(
        read_topic(config, config.alert_topic, until=3, timeout_s=20, isolation_level=COMMITTED)
    )
    alerted = Counter(a["offset"] for a in alerts)
    assert 200 not in alerted and {100, 300, 400} <= set(alerted)
    assert _refused(text, "alert", "too_large") == 1
    assert _refused(text, "dead_letter", "invalid_record") == 1
    assert _refused(text, "score", "too_large") >= 1
    if guarantee == "exactly_once":
        assert max(alerted.values()) == 1
        # one abort per refusal at most: the first scores frames, the alert, the dead letter
        assert 1 <= _aborts(text) <= 10, _aborts(text)
