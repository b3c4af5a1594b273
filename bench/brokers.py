"""The broker a benchmark runs against (--engine) and the side-by-side table of its runs.

    --engine tansu   the embedded Tansu, in memory (the default)
    --engine kafka   a real Apache Kafka (KRaft, one JVM; streams/brokers/apache_kafka.py)
    --engine both    both in the same invocation, alternating: tansu, kafka, tansu, kafka, ...

Every run gets a fresh broker, stopped at its end, so that no run measures what an earlier one
left in the broker (Tansu's in-memory log grows over minutes). `stream.fetch_max_wait_ms`
differs by engine (FETCH_MAX_WAIT_MS). A broker's CPU time is read from /proc/<pid>/stat: the
pid is the Tansu process or the JVM itself (started without a shell), and that file sums the
user and system time of all the process's threads, those that have ended included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from streams.brokers.local import ENGINES, Broker, create_broker
from streams.config import StreamConfig

ENGINE_CHOICES = (*ENGINES, "both")

# Tansu checks a held fetch for new data only at half of the wait, so a record can wait up to
# half of it: the worker's short default. Real Kafka answers a held fetch when data arrives; a
# longer wait there only saves idle fetch round trips (kafka-python CPU each).
FETCH_MAX_WAIT_MS = {"tansu": StreamConfig().fetch_max_wait_ms, "kafka": 500}


def add_engine_options(
    parser: argparse.ArgumentParser,
    *,
    repeats: bool = True,
    default: str = "tansu",
    fetch_wait: bool = True,
) -> None:
    """--engine, and --repeats when `repeats`; `fetch_wait`: the help names FETCH_MAX_WAIT_MS."""
    waits = ", ".join(f"{ms} ms on {engine}" for engine, ms in FETCH_MAX_WAIT_MS.items())
    parser.add_argument(
        "--engine",
        default=default,
        choices=ENGINE_CHOICES,
        help="the broker: embedded Tansu, a real Apache Kafka, or both alternating (default "
        f"{default})" + (f"; stream.fetch_max_wait_ms is {waits}" if fetch_wait else ""),
    )
    if repeats:
        parser.add_argument(
            "--repeats",
            type=int,
            default=1,
            help="runs per engine, each on a fresh broker; with --engine both the engines "
            "alternate (tansu, kafka, tansu, ...)",
        )


def run_order(engine: str, repeats: int = 1) -> list[str]:
    """The engine of each run: ['tansu', 'kafka', 'tansu', 'kafka'] for ('both', 2)."""
    engines = ENGINES if engine == "both" else (engine,)
    return [name for _ in range(repeats) for name in engines]


def note(message: str) -> None:
    """Progress on stderr, so that stdout holds only the results."""
    print(message, file=sys.stderr, flush=True)


@contextmanager
def started_broker(engine: str, *, label: str = "", detail: str = "") -> Iterator[Broker]:
    """A fresh broker of `engine`, stopped (and its data gone) on leaving."""
    with create_broker(engine) as broker:
        note(f"{label}{broker.description} on {broker.bootstrap_servers}, pid {broker.pid}{detail}")
        yield broker


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads, so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_cpu_s(broker: Broker) -> float:
    if broker.pid is None:
        raise RuntimeError(f"{broker.description} is not running: no CPU time to read")
    return process_cpu_s(broker.pid)


def flatten(summary: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) summary under dotted names; anything else is left out."""
    numbers: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            numbers |= flatten(value, f"{name}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            numbers[name] = value
    return numbers


def side_by_side(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """A markdown table of every number in the runs' summaries: per engine the median of its
    runs (and their range when there are several), and the ratio of the medians, kafka / tansu,
    when both engines ran."""
    engines = list(dict.fromkeys(engine for engine, _ in runs))
    flat = [(engine, flatten(summary)) for engine, summary in runs]
    names = list(dict.fromkeys(name for _, numbers in flat for name in numbers))
    header = ["figure"]
    for engine in engines:
        count = sum(1 for e, _ in runs if e == engine)
        header.append(engine if count == 1 else f"{engine} (median of {count}, range)")
    ratio = engines == list(ENGINES)
    if ratio:
        header.append("kafka / tansu")
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name in names:
        row, medians = [name], []
        for engine in engines:
            values = [n[name] for e, n in flat if e == engine and name in n]
            median = statistics.median(values) if values else None
            medians.append(median)
            cell = _number(median) if values else ""
            if len(values) > 1:
                cell += f" ({_number(min(values))}-{_number(max(values))})"
            row.append(cell)
        if ratio:
            tansu, kafka = medians
            row.append(f"{kafka / tansu:.2f}" if tansu and kafka is not None else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
