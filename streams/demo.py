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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from prometheus_client import CollectorRegistry

from detector import Detector
from streams.brokers.local import create_broker, free_port
from streams.config import MetricsConfig, StreamConfig
from streams.kafka_io import create_producer, ensure_topics
from streams.replay import plan_replay, replay
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
) -> int:
    """Run the demo to its end (or to SIGTERM/SIGINT); 0 when every record sent was scored and
    the worker exited cleanly, else 1. `start_console(stream, port)` starts the console
    following `stream`'s alert topic."""
    metrics_port = run.metrics_port or free_port()
    metrics = metrics.model_copy(update={"host": "127.0.0.1", "port": metrics_port})
    with create_broker(run.engine) as broker:
        stream = stream.model_copy(
            update={
                "bootstrap_servers": broker.bootstrap_servers,
                "scores_topic": stream.scores_topic or "scores",
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
                images=images,
                labels=labels,
                plan=plan,
                codec=stream.codec,
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
    return 0 if complete and outcome == [0] else 1
