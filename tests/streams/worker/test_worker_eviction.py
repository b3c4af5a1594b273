"""Readiness follows the consumer group against the real embedded broker and a real `vaewatch
worker` (docs/delivery.md, "Liveness and readiness"): a worker evicted from its group because its
loop did not poll within max_poll_interval_ms answers /readyz 503 (the `group_joined` check) and
exports `vaewatch_ready 0` within seconds; once the loop runs again it rejoins, is ready again,
loses no record and exits 0 on SIGTERM.

The stall is real: the worker's scoring process is frozen (SIGSTOP) while it holds two full
batches, so the loop blocks waiting for the scores (scoring_timeout_s is long) and stops polling;
kafka-python's heartbeat thread then leaves the group once max_poll_interval_ms has passed.
liveness_timeout_s is long too, so that only the eviction can make the worker unready."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from kafka import KafkaProducer

from tests.fixtures_broker import StreamTopics, make_topics, start_worker, wait_ready
from tests.streams.kafka_helpers import committed_offsets, raw_images, read_topic

pytestmark = pytest.mark.slow

BATCH = 100
N = 600  # six full batches, sent as one record batch so that the worker fetches them at once
MAX_POLL_INTERVAL_MS = 3000  # the smallest the settings allow is 1000
EVICTION_LOG = "Consumer poll timeout has expired"  # kafka-python's heartbeat thread, WARNING
SETTINGS = [
    "--set",
    f"stream.max_poll_interval_ms={MAX_POLL_INTERVAL_MS}",
    "--set",
    "stream.scoring_timeout_s=300",  # the loop waits for the frozen child, never restarts it
    "--set",
    "stream.liveness_timeout_s=300",  # so the readiness drop can only be the eviction's
]


def _produce_one_batch(topics: StreamTopics, values: list[bytes]) -> None:
    """All `values` in one produce request (one record batch): the worker's first fetch returns
    them all, so it cuts full batches for the scoring process instead of scoring small
    deadline-cut ones in its own process."""
    producer = KafkaProducer(
        bootstrap_servers=topics.bootstrap_servers,
        acks="all",
        linger_ms=60_000,  # nothing leaves before flush()
        batch_size=2 * 1024 * 1024,
        max_request_size=4 * 1024 * 1024,
    )
    try:
        topic = topics.config.input_topic
        futures = [producer.send(topic, value=value, partition=0) for value in values]
        producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close()


def _readyz(url: str) -> tuple[int, dict | None]:
    """(HTTP status, JSON body) of /readyz; (0, None) when it did not answer in time."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, None


def _eviction_logged_at(log: str) -> float | None:
    """time.time() of the worker's first poll-timeout warning (its log's asctime, local time)."""
    for line in log.splitlines():
        if EVICTION_LOG in line:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def _source_offsets(topics: StreamTopics, n: int) -> tuple[set[int], set[int]]:
    """Input offsets found in the scores topic and in the dead-letter topic."""
    config = topics.config
    scores = read_topic(config, config.scores_topic, until=n, timeout_s=60)
    scored = {json.loads(r.value)["offset"] for r in scores}
    missing = n - len(scored)
    dead = read_topic(config, config.dlq_topic, until=missing, timeout_s=30) if missing else []
    lettered = {int(dict(r.headers)["vaewatch.source.offset"]) for r in dead}
    return scored, lettered


def test_an_evicted_worker_is_unready_until_it_rejoins_and_loses_nothing(
    kafka_broker, trained_bundle, tmp_path
) -> None:
    topics = make_topics(kafka_broker, max_batch_size=BATCH)
    worker = start_worker(
        model=trained_bundle, topics=topics, log_dir=tmp_path, extra_args=SETTINGS, timeout_s=60
    )
    frozen: int | None = None
    try:
        # Ready on an empty topic: joined, stable, the scoring process has loaded the model.
        status, body = _readyz(worker.url)
        assert status == 200 and body is not None and body["ready"], (status, body)
        frozen = worker.scoring_child()
        os.kill(frozen, signal.SIGSTOP)

        _produce_one_batch(topics, raw_images(N, seed=11))
        produced_at = time.time()

        # The loop hands two full batches to the frozen child and blocks on the first one's
        # scores; past max_poll_interval_ms the heartbeat thread leaves the group.
        deadline = time.monotonic() + MAX_POLL_INTERVAL_MS / 1000 + 20
        while time.monotonic() < deadline:
            assert worker.process.poll() is None, worker.log()
            status, body = _readyz(worker.url)
            if status == 503:
                break
            time.sleep(0.1)
        unready_at = time.time()
        assert status == 503, f"/readyz still {status} {body}; log:\n{worker.log()}"
        # The loop is still blocked (the child is frozen): the gauge reads the same state.
        assert worker.metric("vaewatch_ready") == 0
        assert body == {
            "ready": False,
            "checks": {
                "model_loaded": True,
                "broker_connected": True,
                "authorized": True,
                "group_joined": False,  # joined, but no longer a stable member: evicted
                "making_progress": True,
            },
        }, body
        evicted_at = _eviction_logged_at(worker.log())
        assert evicted_at is not None, f"no eviction in the log:\n{worker.log()}"
        # At once: the 503 is seen within a few seconds of kafka-python's poll-timeout warning
        # (it follows the LeaveGroup round trip; the probe polls every 0.1 s).
        assert -1.0 <= unready_at - evicted_at <= 5.0, (unready_at - evicted_at, worker.log())
        assert evicted_at - produced_at >= MAX_POLL_INTERVAL_MS / 1000 - 1.0

        # The loop runs again: it publishes, polls, rejoins the group and is ready again.
        os.kill(frozen, signal.SIGCONT)
        thawed_at = time.time()
        body = wait_ready(worker.url, timeout_s=30, process=worker.process)
        ready_again_s = time.time() - thawed_at
        assert body["ready"] and all(body["checks"].values()), body
        assert worker.log().count("partitions assigned") >= 2, worker.log()  # it rejoined
        # Lost, not revoked: the group gave them away, so the worker commits nothing for them.
        assert "partitions lost (evicted from the group)" in worker.log(), worker.log()
        assert worker.metric("vaewatch_ready") == 1

        # Nothing lost: every input offset has a score or a dead letter, and all is committed.
        scored, lettered = _source_offsets(topics, N)
        assert scored | lettered == set(range(N)), sorted(set(range(N)) - scored - lettered)
        deadline = time.monotonic() + 30
        while committed_offsets(topics.config)[0] != N and time.monotonic() < deadline:
            time.sleep(0.3)
        assert committed_offsets(topics.config)[0] == N, worker.log()
        assert worker.process.poll() is None, worker.log()
    finally:
        if frozen is not None and Path(f"/proc/{frozen}").exists():
            os.kill(frozen, signal.SIGCONT)
        code = worker.stop()
    assert code == 0, worker.log()
    print(
        f"eviction {evicted_at - produced_at:.1f} s after the records, /readyz 503 "
        f"{unready_at - evicted_at:+.1f} s after it, ready again {ready_again_s:.1f} s after "
        f"SIGCONT; {len(scored)} scored, {len(lettered)} dead-lettered"
    )
