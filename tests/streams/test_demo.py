"""The demo's parts that need no broker: its dead-letter count read from the worker's own
metrics, and its summary line. The whole demo runs in tests/streams/test_commands.py."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from streams.demo import dead_letters, summary_line
from streams.tally import Tally
from streams.worker.metrics import WorkerMetrics


def test_dead_letters_sums_every_reason_of_the_workers_counter() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry=registry, score_buckets=[1.0, 2.0])
    assert dead_letters(registry) == 0
    metrics.dead_letters.labels(reason="wrong_length").inc(2)
    metrics.dead_letters.labels(reason="null_value").inc()
    metrics.records.labels(outcome="invalid").inc(5)  # another counter: not counted
    assert dead_letters(registry) == 3


def test_the_summary_line_reads_as_before() -> None:
    tally = Tally(scored=200, flagged=20, true_positives=15, labelled_anomalies=30)
    assert summary_line(tally, 250, 2.0, 3) == (
        "[  2.0s] sent    250  scored    200 (   100/s)  alerts    20 (10.0%)  "
        "precision 0.75  recall 0.50  dead letters 3"
    )
    assert "precision -" in summary_line(Tally(), 0, 0.0, 0)
