"""The demo's parts that need no broker: its dead-letter count read from the worker's own
metrics, and its summary line. The whole demo runs in tests/streams/test_commands.py."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry

from streams.demo import closing_lines, dead_letters, summary_line
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


def test_the_closing_lines_say_what_the_figures_mean_class_by_class() -> None:
    tally = Tally(scored=1000, flagged=40, true_positives=36, labelled_anomalies=100)
    tally.by_label = {"0": [900, 4], "7": [50, 35], "1": [50, 1]}
    tally.truths = [False] * 900 + [True] * 100
    tally.scores = list(range(1000))  # every anomaly above every normal image
    lines = closing_lines(
        tally,
        normal_classes=[0],
        target_fpr=0.01,
        class_names={0: "T-shirt/top", 1: "Trouser", 7: "Sneaker"},
        auroc=lambda truths, scores: float(np.mean(scores[truths]) > np.mean(scores[~truths])),
    )
    text = "\n".join(lines)
    assert "AUROC 1.000" in text
    assert "4 of 900 normal (T-shirt/top) images raised an alert (0.4%)" in text
    assert "at most 1% would" in text
    assert "recall 0.36: 36 of 100 anomalies raised an alert: Sneaker 0.70, Trouser 0.02" in text
    assert "precision 0.90: 36 of the 40 alerts" in text
    assert "(Sneaker mostly); Trouser score above most normal images" in text
