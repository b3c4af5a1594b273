"""`vaewatch demo`'s stream: a local broker and its topics, a worker in a thread, the console,
a labelled replay with three malformed records, and a running tally against the labels.

The images, the model and the console come in as arguments (the demo trains with trainer/ and
shows serve/'s console, neither of which streams/ imports); what it has to say goes to `say`,
one line at a time, so the command decides where it is printed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from prometheus_client import CollectorRegistry

from detector import Detector
from detector.preprocess import ImageSettings
from streams.brokers.local import create_broker, free_port
from streams.config import MetricsConfig, StreamConfig
from streams.kafka_io import create_producer, ensure_topics
from streams.replay import ArrayRecords, plan_replay, replay
from streams.signals import stop_on_signals
from streams.tally import ScoresReader, Tally
from streams.worker_process import run_worker_process

logger = logging.getLogger(__name__)

# Three records the worker cannot use, to show the dead-letter topic at work.
MALFORMED = (b"too short", b"\x00" * 785, b"")
_DRAIN_S = 60.0  # how long the demo waits for the worker to score what was sent


class Console(Protocol):
    url: str

    def stop(self) -> None: ...


@dataclass(frozen=True)
class DemoRun:
    """The command's options: the engine of the local broker, what to replay, and where."""

    engine: str
    count: int
    rate: float
    anomaly_fraction: float
    metrics_port: int = 0  # 0: a free port
    console_port: int = 0


def dead_letters(registry: CollectorRegistry) -> int:
    """Dead letters the worker has had acknowledged, from its own metrics."""
    return int(
        sum(
            sample.value
            for metric in registry.collect()
            if metric.name == "vaewatch_dead_letters"
            for sample in metric.samples
            if sample.name == "vaewatch_dead_letters_total"
        )
    )


def summary_line(tally: Tally, sent: int, elapsed: float, dead: int) -> str:
    rate = tally.scored / elapsed if elapsed > 0 else 0.0
    anomaly_rate = tally.flagged / tally.scored if tally.scored else 0.0
    precision = f"{tally.precision:.2f}" if tally.flagged else "-"
    return (
        f"[{elapsed:5.1f}s] sent {sent:6d}  scored {tally.scored:6d} ({rate:6.0f}/s)  "
        f"alerts {tally.flagged:5d} ({anomaly_rate:5.1%})  precision {precision}  "
        f"recall {tally.recall:.2f}  dead letters {dead}"
    )


LEGEND = (
    "live: records sent and scored (per second), alerts (share of scored), precision (share of "
    "alerts whose record is labelled an anomaly), recall (share of labelled anomalies that "
    "raised an alert)"
)


def closing_lines(
    tally: Tally,
    *,
    normal_classes: Sequence[int],
    target_fpr: float,
    class_names: Mapping[int, str] | None = None,
    auroc: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> list[str]:
    """What the figures mean: how well the scores rank anomalies above normal images (`auroc`,
    of labels and scores), how many normal images the threshold lets raise an alert against
    the rate it was set for, and the recall of each anomalous class. One recall figure for all
    of them reads as "misses most anomalies"; these show which it misses and why."""
    names = dict(class_names or {})

    def name(label: str) -> str:
        return names.get(int(label), label) if label.isdecimal() else label

    normal = ", ".join(name(str(c)) for c in normal_classes)
    n_normal = tally.scored - tally.labelled_anomalies
    lines = []
    truths = np.asarray(tally.truths, dtype=bool)
    if auroc is not None and truths.any() and not truths.all():
        area = auroc(truths, np.asarray(tally.scores))
        lines.append(
            f"ranking: AUROC {area:.3f}, the chance that an anomaly scores above a normal image "
            "(1 is perfect, 0.5 is chance): the score itself, whatever the threshold"
        )
    lines.append(
        f"threshold: {tally.flagged - tally.true_positives} of {n_normal} normal ({normal}) "
        f"images raised an alert ({tally.false_positive_rate:.1%}); it was set so that at most "
        f"{target_fpr:.0%} would (calibration.target_fpr, on held-out normal images)"
    )
    normal_labels = {str(c) for c in normal_classes}
    recalls = sorted(
        ((counts[1] / counts[0], label) for label, counts in tally.by_label.items()
         if label not in normal_labels and counts[0]),
        reverse=True,
    )  # fmt: skip
    lines.append(
        f"recall {tally.recall:.2f}: {tally.true_positives} of {tally.labelled_anomalies} "
        "anomalies raised an alert"
        + (": " + ", ".join(f"{name(label)} {r:.2f}" for r, label in recalls) if recalls else "")
    )
    lines.append(
        f"precision {tally.precision:.2f}: {tally.true_positives} of the {tally.flagged} alerts "
        "were anomalies"
    )
    caught = [name(label) for r, label in recalls if r >= 0.5]
    missed = [name(label) for r, label in recalls if r < 0.1]
    if caught or missed:
        lines.append(
            "So: the alerts are the images that score far above the normal ones"
            + (f" ({', '.join(caught)} mostly)" if caught else "")
            + "; "
            + (f"{', '.join(missed)} score" if missed else "the rest score")
            + " above most normal images (the ranking) but seldom past a threshold this strict. "
            "Raise calibration.target_fpr for more recall at more false alarms, train longer "
            "(the demo's quick model has few epochs), or pick a more distinctive normal class"
            + (
                ' (vaewatch demo --set "data.normal_classes=[1]" --model models/trouser).'
                if names.get(1) == "Trouser" and list(normal_classes) != [1]
                else "."
            )
        )
    return lines


def run_demo(
    run: DemoRun,
    *,
    images: np.ndarray,
    labels: np.ndarray | None,
    normal_classes: Sequence[int],
    detector: Detector,
    stream: StreamConfig,
    metrics: MetricsConfig,
    start_console: Callable[[StreamConfig, int], Console],
    say: Callable[[str], None],
    image_settings: ImageSettings | None = None,
    class_names: Mapping[int, str] | None = None,
    auroc: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> int:
    """Run the demo to its end (or to SIGTERM/SIGINT); 0 when every record sent was scored and
    the worker exited cleanly, else 1. `start_console(stream, port)` starts the console
    following `stream`'s alert topic; `class_names` name the labels and `auroc(is_anomaly,
    scores)` measures the ranking in the closing lines."""
    metrics_port = run.metrics_port or free_port()
    metrics = metrics.model_copy(update={"host": "127.0.0.1", "port": metrics_port})
    with create_broker(run.engine) as broker:
        stream = stream.model_copy(
            update={
                "bootstrap_servers": broker.bootstrap_servers,
                "scores_topic": stream.scores_topic or "scores",
                # The tally reads each score's label and anomaly headers, which frames drop.
                "scores_format": "record",
                "group_id": "vaewatch-demo",
            }
        )
        topics = [stream.input_topic, stream.alert_topic, stream.scores_topic, stream.dlq_topic]
        ensure_topics(config=stream, topics=topics, partitions=2)
        say(f"broker: {broker.description} on {broker.bootstrap_servers}")
        stop_worker = threading.Event()
        outcome: list[int] = []
        registry = CollectorRegistry()
        worker = threading.Thread(
            target=lambda: outcome.append(
                run_worker_process(
                    stream=stream,
                    metrics_config=metrics,
                    detector=detector,
                    stop=stop_worker,
                    registry=registry,
                    images=image_settings,
                )
            ),
            name="worker",
        )
        worker.start()
        say(
            f"worker: model {detector.version} on {detector.device}; metrics, /healthz, "
            f"/readyz at http://127.0.0.1:{metrics_port}/metrics"
        )
        console = start_console(stream, run.console_port)
        say(f"console: {console.url}/ (live alerts, score, generate; API docs at /docs)")
        plan = plan_replay(
            labels=labels,
            normal_classes=normal_classes,
            count=run.count,
            anomaly_fraction=run.anomaly_fraction,
            seed=0,
        )
        say(
            f"replay: {run.count} test images at {run.rate:.0f}/s, {run.anomaly_fraction:.0%} "
            f"anomalies (classes other than {list(normal_classes)}), plus 3 malformed records"
        )
        producer = create_producer(config=stream)
        for bad in MALFORMED:
            producer.send(stream.input_topic, value=bad, headers=[("id", b"malformed")])
        reader = ScoresReader(config=stream, topic=stream.scores_topic)
        say(LEGEND)
        started = time.monotonic()
        sent = [0]
        last_print = [0.0]

        def progress(count: int) -> None:
            sent[0] = count
            tally = reader.poll(timeout_ms=0)
            now = time.monotonic()
            if now - last_print[0] >= 1.0:
                last_print[0] = now
                say(summary_line(tally, count, now - started, dead_letters(registry)))

        with stop_on_signals() as interrupted:
            replay(
                producer=producer,
                topic=stream.input_topic,
                records=ArrayRecords(images, labels, codec=stream.codec),
                plan=plan,
                rate=run.rate,
                should_stop=interrupted.is_set,
                on_progress=progress,
            )
            deadline = time.monotonic() + _DRAIN_S
            while reader.tally.scored < sent[0] and time.monotonic() < deadline:
                if interrupted.is_set():
                    break
                progress(sent[0])
                reader.poll(timeout_ms=200)
        tally = reader.tally
        stop_worker.set()
        worker.join()
        console.stop()
        say(summary_line(tally, sent[0], time.monotonic() - started, dead_letters(registry)))
        reader.close()
        producer.close()
    complete = tally.scored >= sent[0]
    say(
        f"done: {tally.scored} of {sent[0]} records scored"
        f"{'' if complete else ' (incomplete)'}, {tally.flagged} alerts, precision "
        f"{tally.precision:.2f}, recall {tally.recall:.2f} against the labels; worker exit "
        f"code {outcome[0] if outcome else '?'}; broker stopped"
    )
    if labels is not None and tally.scored:
        for line in closing_lines(
            tally,
            normal_classes=normal_classes,
            target_fpr=detector.calibration.target_fpr,
            class_names=class_names,
            auroc=auroc,
        ):
            say(line)
    return 0 if complete and outcome == [0] else 1
