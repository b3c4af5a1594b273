"""Replays labelled images into a topic at a steady rate (`vaewatch produce`, the demo, benchmarks):
images of an array encoded by a codec (`ArrayRecords`), or image files sent as they are
(`FileRecords`, for the image codec: `vaewatch produce --from DIR`).

Each record carries headers `label` (the dataset's class: its number, or a folder's class name),
`anomaly` ("1" when the class is not one of the normal classes, else "0"; left out for
unlabelled files) and `id` (`<split>-<index>`, or the file's path in the folder); the worker
passes headers through to alerts and scores, so a subscriber can score the detector against the
labels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from kafka import KafkaProducer
from kafka.errors import KafkaError

from streams.codec import encode_images
from streams.config import StreamConfig
from streams.connection_errors import kafka_errors_in_one_line
from streams.kafka_io import create_producer, ensure_topics
from streams.signals import stop_on_signals

logger = logging.getLogger(__name__)

LABEL_HEADER = "label"
ANOMALY_HEADER = "anomaly"
ID_HEADER = "id"


class SendFailedError(KafkaError):
    """Some sends of a replay were not acknowledged: how many, and the first one's error
    (`cause`)."""

    def __init__(self, failed: int, first: BaseException) -> None:
        super().__init__(f"{failed} records were not sent")
        self.cause = first

    def __str__(self) -> str:
        return str(self.args[0])


class _Failures:
    def __init__(self) -> None:
        self.count = 0
        self.first: BaseException | None = None

    def record(self, exc: BaseException) -> None:
        self.count += 1
        self.first = self.first or exc


class ReplayRecords(Protocol):
    """What a replay sends: one record per row, its value, id and label."""

    labels: np.ndarray | None

    def __len__(self) -> int: ...

    def values(self, rows: np.ndarray) -> list[bytes]: ...

    def ids(self, rows: np.ndarray) -> list[str]: ...

    def label_text(self, label: int) -> str: ...


@dataclass(frozen=True)
class ArrayRecords:
    """uint8 images N x 784, encoded by `codec` (raw, json, or image: a 28 x 28 PNG each)."""

    images: np.ndarray
    labels: np.ndarray | None
    codec: str = "raw"
    split: str = "test"

    def __len__(self) -> int:
        return len(self.images)

    def ids(self, rows: np.ndarray) -> list[str]:
        return [f"{self.split}-{i}" for i in rows.tolist()]

    def values(self, rows: np.ndarray) -> list[bytes]:
        return encode_images(self.images[rows], codec=self.codec, ids=self.ids(rows))

    def label_text(self, label: int) -> str:
        return str(label)


@dataclass(frozen=True)
class FileRecords:
    """Image files, each sent as it is (its bytes are the record's value), id its path in
    `root`; labels and class names of a folder's class subfolders."""

    root: Path
    files: Sequence[Path]
    labels: np.ndarray | None = None
    classes: dict[int, str] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def ids(self, rows: np.ndarray) -> list[str]:
        return [self.files[i].relative_to(self.root).as_posix() for i in rows.tolist()]

    def values(self, rows: np.ndarray) -> list[bytes]:
        return [self.files[i].read_bytes() for i in rows.tolist()]

    def label_text(self, label: int) -> str:
        return self.classes.get(label, str(label)) if self.classes else str(label)


@dataclass(frozen=True)
class ReplayPlan:
    """Which dataset rows to send, in order, and whether each one is an anomaly."""

    indices: np.ndarray
    anomalous: np.ndarray | None  # None: unlabelled, no anomaly header


def plan_replay(
    *,
    labels: np.ndarray | None,
    normal_classes: Sequence[int],
    count: int,
    anomaly_fraction: float | None = None,
    seed: int = 0,
    size: int | None = None,
) -> ReplayPlan:
    """`count` rows cycling through the data set. With `anomaly_fraction`, rows are drawn so that
    about that share are anomalies (the rest normal), shuffled; otherwise in dataset order."""
    if labels is None:  # unlabelled: every image is taken as normal, `size` says how many
        indices = np.resize(np.arange(size if size is not None else count), count)
        return ReplayPlan(indices=indices, anomalous=None)
    is_anomaly = ~np.isin(labels, np.asarray(normal_classes))
    if anomaly_fraction is None:
        indices = np.resize(np.arange(len(labels)), count)
    else:
        rng = np.random.default_rng(seed)
        n_anomaly = round(count * anomaly_fraction)
        normal_rows, anomaly_rows = np.flatnonzero(~is_anomaly), np.flatnonzero(is_anomaly)
        if len(normal_rows) == 0 or (n_anomaly and len(anomaly_rows) == 0):
            raise ValueError("the data set lacks normal or anomalous images for this mix")
        picks = [
            np.resize(rng.permutation(normal_rows), count - n_anomaly),
            np.resize(rng.permutation(anomaly_rows), n_anomaly) if n_anomaly else [],
        ]
        indices = rng.permutation(np.concatenate(picks).astype(np.int64))
    return ReplayPlan(indices=indices, anomalous=is_anomaly[indices])


def replay(
    *,
    producer: KafkaProducer,
    topic: str,
    records: ReplayRecords,
    plan: ReplayPlan,
    rate: float = 0.0,
    should_stop: Callable[[], bool] = lambda: False,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Send the planned rows; `rate` records/s (0 = as fast as possible). Returns the count sent
    and acknowledged; raises SendFailedError when the broker refused some (a missing WRITE
    ACL, say). Paced against a fixed schedule (record i at start + i/rate), so the rate stays
    steady."""
    failures = _Failures()
    chunk = 256 if rate <= 0 else max(1, min(256, int(rate / 1000)))
    start = time.monotonic()
    sent = 0
    total = len(plan.indices)
    last_progress = start
    labels = records.labels
    while sent < total and not should_stop():
        rows = plan.indices[sent : sent + chunk]
        values = records.values(rows)
        ids = records.ids(rows)
        flags = (
            plan.anomalous[sent : sent + chunk].tolist()
            if plan.anomalous is not None
            else [None] * len(rows)
        )
        row_labels = labels[rows].tolist() if labels is not None else [None] * len(rows)
        if rate > 0:
            wait = start + sent / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        for value, record_id, label, flag in zip(values, ids, row_labels, flags, strict=True):
            headers = [(ID_HEADER, record_id.encode())]
            if flag is not None:
                headers.append((ANOMALY_HEADER, b"1" if flag else b"0"))
            if label is not None:
                headers.append((LABEL_HEADER, records.label_text(label).encode()))
            producer.send(topic, value=value, headers=headers).add_errback(failures.record)
        sent += len(rows)
        now = time.monotonic()
        if on_progress is not None and now - last_progress >= 0.5:
            last_progress = now
            on_progress(sent)
    producer.flush()
    if on_progress is not None:
        on_progress(sent)
    if failures.first is not None:
        raise SendFailedError(failures.count, failures.first)
    return sent


def replay_to_topic(
    *,
    config: StreamConfig,
    topic: str,
    records: ReplayRecords,
    normal_classes: Sequence[int] | None,
    count: int,
    anomaly_fraction: float | None,
    seed: int,
    rate: float,
    partitions: int = 0,
) -> tuple[int, float]:
    """`vaewatch produce`: plan `count` rows, send them to `topic` (created with `partitions`
    when that is set and the topic is missing) until done or SIGTERM/SIGINT; returns (records
    sent, seconds it took). Without `normal_classes` no record says whether it is an anomaly.
    What the broker refuses raises BrokerRefusedError (one line)."""
    with kafka_errors_in_one_line(config, what=topic, operation="WRITE"):
        if partitions:
            ensure_topics(config=config, topics=[topic], partitions=partitions)
        plan = plan_replay(
            labels=records.labels if normal_classes is not None else None,
            normal_classes=normal_classes or (),
            count=count,
            anomaly_fraction=anomaly_fraction,
            seed=seed,
            size=len(records),
        )
        producer = create_producer(config=config)
        started = time.monotonic()
        try:
            with stop_on_signals() as stop:
                sent = replay(
                    producer=producer,
                    topic=topic,
                    records=records,
                    plan=plan,
                    rate=rate,
                    should_stop=stop.is_set,
                )
        finally:
            producer.close()
        return sent, time.monotonic() - started
