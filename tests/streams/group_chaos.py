"""A consumer group under chaos, against a real broker: `workers` real `vaewatch worker`
processes share an input topic of `partitions` partitions while real Fashion-MNIST images are
produced at a steady rate; every `kill_every_s` one member that is ready is SIGKILLed and
restarted at once (mode "kill"), or every member in turn is stopped with SIGTERM and restarted
(mode "rolling"). Then every input offset is looked up in the scores and dead-letter topics.

Used by tests/streams/worker/test_group_chaos_live.py (short runs) and bench/group_chaos.py (long,
repeated runs). The report says what at-least-once promises: nothing lost; a duplicate only
where a kill left work uncommitted (its offset at or past the group's committed offset just
before some kill of a member); none at all from SIGTERM.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from streams.codec import encode_images
from tests.fixtures_broker import StreamTopics, WorkerProcess, make_topics, start_worker

Offsets = dict[int, int]


@dataclass
class ChaosReport:
    records: int
    # (partition, offset) with neither a score nor a dead letter although the group committed
    # past it: what at-least-once forbids
    lost: list[tuple[int, int]]
    # ... not reached by the end of the run: at or past the committed offset, consumed again by
    # the next member (a group that did not drain its backlog within settle_timeout_s)
    unfinished: list[tuple[int, int]]
    duplicates: int  # outputs beyond the first, over all records
    unexplained_duplicates: list[tuple[int, int]]  # not left uncommitted by any kill
    kills: int
    stops: int
    exit_codes: list[int]  # of every SIGTERM: the rolling restarts and the final stop
    rebalances: int  # "partitions assigned" lines in the members' logs
    longest_wait_s: float  # the longest any record waited for its first score
    max_lag: int  # the most records produced but not committed, sampled every 0.5 s
    seconds: float
    duplicates_per_kill: list[int] = field(default_factory=list)
    exactly_once: bool = False  # then any duplicate fails, explained or not
    # once the group committed everything and every member was ready again, before the final
    # stop: per member process, whether it still ran; and the partitions of each group member
    running: list[bool] = field(default_factory=list)
    held: list[int] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            not self.lost
            and not self.unfinished
            and not self.unexplained_duplicates
            and not (self.exactly_once and self.duplicates)
            and all(code == 0 for code in self.exit_codes)
        )

    def summary(self) -> str:
        return (
            f"{self.records} records, {len(self.lost)} lost, {len(self.unfinished)} not "
            f"reached, {self.duplicates} duplicates "
            f"({len(self.unexplained_duplicates)} unexplained), {self.kills} kills, "
            f"{self.stops} SIGTERM restarts, {self.rebalances} assignments, longest wait "
            f"{self.longest_wait_s:.1f} s, max lag {self.max_lag}, {self.seconds:.0f} s"
        )


class _Group:
    """The members, started and stopped by the chaos loop."""

    def __init__(
        self,
        *,
        model: Path,
        topics: StreamTopics,
        log_dir: Path,
        args: list[str],
        exactly_once: bool = False,
        stable_ids: bool = True,
    ):
        self._start = dict(model=model, topics=topics, log_dir=log_dir)
        self._args = args
        self._group = topics.config.group_id
        self._stable_ids = exactly_once and stable_ids
        self.members: list[WorkerProcess] = []
        self.logs: list[Path] = []
        self.started_at: dict[int, float] = {}
        # exactly_once with stable_ids: each member keeps a transactional id, and its replacement
        # after a kill takes it over (as a StatefulSet's pod would), which aborts what the victim
        # left open; without, every process has its own (the default)
        self.slots: dict[int, int] = {}  # pid -> slot

    def start(self, *, wait: bool, slot: int | None = None) -> WorkerProcess:
        slot = len(self.slots) if slot is None else slot
        args = list(self._args)
        if self._stable_ids:
            args += ["--set", f"stream.transactional_id={self._group}-{slot}"]
        member = start_worker(**self._start, extra_args=args, wait=wait, timeout_s=90.0)
        self.slots[member.process.pid] = slot
        self.members.append(member)
        self.logs.append(member.log_path)
        self.started_at[member.process.pid] = time.monotonic()
        return member

    def start_all(self, n: int) -> None:
        """Start n members at once, then wait until each is ready (started one at a time,
        each would wait out its own interpreter start and model load)."""
        started = [self.start(wait=False) for _ in range(n)]
        try:
            for member in started:
                member.wait_ready(timeout_s=90.0)
        except RuntimeError:
            for other in started:
                other.process.kill()
                other.process.wait()
            raise

    def stop_all(self) -> list[int]:
        """SIGTERM to every member at once, then their exit codes (the drains overlap; a
        second SIGTERM would cut a drain short)."""
        for member in self.members:
            if member.process.poll() is None:
                member.process.send_signal(signal.SIGTERM)
        return [member.wait(timeout_s=60) for member in list(self.members)]

    def ready_members(self, *, min_age_s: float) -> list[WorkerProcess]:
        now = time.monotonic()
        return [
            m
            for m in self.members
            if now - self.started_at[m.process.pid] >= min_age_s and _ready(m)
        ]

    def remove(self, member: WorkerProcess) -> None:
        self.members.remove(member)

    def wait_ready(self) -> None:
        """Until every member is ready: a replacement started after the last kill may still be
        starting when the backlog is done (a SIGTERM then kills it before its handler is in)."""
        for member in self.members:
            member.wait_ready(timeout_s=90.0)


def _ready(member: WorkerProcess) -> bool:
    try:
        with urllib.request.urlopen(f"{member.url}/readyz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


class _Producer(threading.Thread):
    """Real images at a steady rate, partition i % partitions; counts what the broker acked."""

    def __init__(self, topics: StreamTopics, images: np.ndarray, *, n: int, rate: float):
        super().__init__(daemon=True)
        self._config = topics.config
        self._values = encode_images(images[np.arange(n) % len(images)], codec="raw")
        self._rate = rate
        self.partitions = len(_admin_partitions(topics))
        self.acked: Counter[int] = Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        producer = KafkaProducer(
            bootstrap_servers=self._config.bootstrap_servers, acks="all", linger_ms=5
        )
        try:
            started = time.monotonic()
            futures = []
            for i, value in enumerate(self._values):
                delay = started + i / self._rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                part = i % self.partitions
                future = producer.send(
                    self._config.input_topic, value=value, key=str(i).encode(), partition=part
                )
                future.add_callback(lambda _, p=part: self.acked.update([p]))
                futures.append(future)
            producer.flush()
            for future in futures:
                future.get(timeout=30)
        except BaseException as exc:  # reported by the chaos loop
            self.error = exc
        finally:
            producer.close()


def _admin_partitions(topics: StreamTopics) -> list[int]:
    consumer = KafkaConsumer(bootstrap_servers=topics.bootstrap_servers)
    try:
        return sorted(consumer.partitions_for_topic(topics.config.input_topic) or {0})
    finally:
        consumer.close()


class _Committed:
    """The group's committed offsets, read with the admin API (no group membership)."""

    def __init__(self, topics: StreamTopics) -> None:
        self._config = topics.config
        self._admin = KafkaAdminClient(bootstrap_servers=topics.bootstrap_servers)

    def read(self) -> Offsets:
        group = self._config.group_id
        offsets = self._admin.list_group_offsets({group: None}).get(group, {})
        return {
            tp.partition: meta.offset
            for tp, meta in offsets.items()
            if tp.topic == self._config.input_topic and meta.offset >= 0
        }

    def held(self) -> list[int]:
        """How many input partitions each member of the group holds."""
        group = self._config.group_id
        members = self._admin.describe_groups([group])[group]["members"]
        return sorted(
            sum(len(a["partitions"]) for a in m["member_assignment"]["assigned_partitions"])
            for m in members
        )

    def close(self) -> None:
        self._admin.close()


def run_chaos(
    *,
    broker: Any,
    model: Path,
    log_dir: Path,
    images: np.ndarray,
    mode: str = "kill",
    workers: int = 3,
    partitions: int = 6,
    records: int = 6000,
    rate: float = 1000.0,
    kill_every_s: float = 5.0,
    kills: int = 3,
    worker_args: list[str] | None = None,
    settle_timeout_s: float = 180.0,
    seed: int = 0,
    exactly_once: bool = False,
    stable_ids: bool = True,
) -> ChaosReport:
    """One chaos run on `broker` (anything with .bootstrap_servers); see the module's text.
    `exactly_once`: the members run stream.processing_guarantee=exactly_once, the outputs are
    read read_committed, and any duplicate fails the run; `stable_ids` false: with the default
    transactional id (one per process) instead of one per member slot."""
    started = time.monotonic()
    chooser = random.Random(seed)
    topics = make_topics(broker, partitions=partitions)
    args = list(worker_args or [])
    if exactly_once:
        args += ["--set", "stream.processing_guarantee=exactly_once"]
    group = _Group(
        model=model,
        topics=topics,
        log_dir=log_dir,
        args=args,
        exactly_once=exactly_once,
        stable_ids=stable_ids,
    )
    group.start_all(workers)
    committed = _Committed(topics)
    producer = _Producer(topics, images, n=records, rate=rate)
    producer.start()
    before_kills: list[Offsets] = []
    exit_codes: list[int] = []
    max_lag = 0
    done = threading.Event()

    def watch_lag() -> None:
        nonlocal max_lag
        watcher = _Committed(topics)
        while not done.wait(0.5):
            now = watcher.read()
            lag = sum(n - now.get(p, 0) for p, n in producer.acked.items())
            max_lag = max(max_lag, lag)
        watcher.close()

    lag_thread = threading.Thread(target=watch_lag, daemon=True)
    lag_thread.start()
    try:
        if mode == "kill":
            for _ in range(kills):
                time.sleep(kill_every_s)
                ready = group.ready_members(min_age_s=1.0)
                if not ready:
                    continue
                victim = chooser.choice(ready)
                before_kills.append(committed.read())
                victim.process.send_signal(signal.SIGKILL)
                victim.process.wait()
                group.remove(victim)
                group.start(wait=False, slot=group.slots[victim.process.pid])
        else:  # rolling: each member in turn, the next once its successor is ready
            for member in list(group.members):
                time.sleep(kill_every_s)
                exit_codes.append(member.stop(timeout_s=60))
                group.remove(member)
                group.start(wait=True, slot=group.slots[member.process.pid])
        producer.join()
        if producer.error is not None:
            raise producer.error
        expected = {p: producer.acked[p] for p in range(producer.partitions)}
        deadline = time.monotonic() + settle_timeout_s
        while committed.read() != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        group.wait_ready()
        running = [m.process.poll() is None for m in group.members]
        held = committed.held()
    finally:
        done.set()
        lag_thread.join()
        committed.close()
        exit_codes += group.stop_all()
    final = _Committed(topics)
    final_committed = final.read()
    final.close()
    outputs = _outputs(topics, expected)
    report = _report(
        expected=expected,
        final_committed=final_committed,
        outputs=outputs,
        before_kills=before_kills,
        group=group,
        exit_codes=exit_codes,
        max_lag=max_lag,
        seconds=time.monotonic() - started,
    )
    report.exactly_once = exactly_once
    report.running, report.held = running, held
    return report


def _outputs(topics: StreamTopics, expected: Offsets) -> dict[tuple[int, int], list[float]]:
    """(partition, offset) -> the wait, in seconds, of each score or dead letter of it."""
    config = topics.config
    consumer = KafkaConsumer(
        bootstrap_servers=config.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        isolation_level="read_committed",  # what exactly_once promises is about these readers
    )
    found: dict[tuple[int, int], list[float]] = {}
    want = {(p, o) for p, n in expected.items() for o in range(n)}
    tps = [
        TopicPartition(topic, p)
        for topic in (config.scores_topic, config.dlq_topic)
        for p in sorted(consumer.partitions_for_topic(topic) or {0})
    ]
    consumer.assign(tps)
    # Reading a long run's outputs back from Tansu takes minutes: allow 2 ms a record.
    deadline, idle = time.monotonic() + max(120.0, len(want) / 500), 0
    while time.monotonic() < deadline and (idle < 5 or not want <= found.keys()):
        polled = consumer.poll(timeout_ms=300, max_records=5000)
        idle = 0 if polled else idle + 1
        for tp, batch in polled.items():
            for record in batch:
                for key, wait in _covered(record, tp.topic == config.dlq_topic):
                    found.setdefault(key, []).append(wait)
        if idle >= 5 and want <= found.keys():
            break
    consumer.close()
    return found


def _covered(record: Any, dead_letter: bool) -> list[tuple[tuple[int, int], float]]:
    if dead_letter:
        headers = dict(record.headers or [])
        key = (int(headers["vaewatch.source.partition"]), int(headers["vaewatch.source.offset"]))
        return [(key, 0.0)]
    out = []
    for line in record.value.splitlines():
        obj = json.loads(line)
        wait = (obj["scored_at_ms"] - obj["timestamp_ms"]) / 1000.0
        out.append(((obj["partition"], obj["offset"]), wait))
    return out


def _report(
    *,
    expected: Offsets,
    final_committed: Offsets,
    outputs: dict[tuple[int, int], list[float]],
    before_kills: list[Offsets],
    group: _Group,
    exit_codes: list[int],
    max_lag: int,
    seconds: float,
) -> ChaosReport:
    want = [(p, o) for p, n in sorted(expected.items()) for o in range(n)]
    missing = [key for key in want if key not in outputs]
    lost = [(p, o) for p, o in missing if o < final_committed.get(p, 0)]
    unfinished = [(p, o) for p, o in missing if o >= final_committed.get(p, 0)]
    duplicated = {key: len(waits) - 1 for key, waits in outputs.items() if len(waits) > 1}
    per_kill = [0] * len(before_kills)
    unexplained = []
    for (p, o), extra in duplicated.items():
        # The last kill before which this offset was not yet committed left it in flight.
        owner = next(
            (k for k in reversed(range(len(before_kills))) if before_kills[k].get(p, 0) <= o),
            None,
        )
        if owner is None:
            unexplained.append((p, o))
        else:
            per_kill[owner] += extra
    rebalances = sum(
        path.read_text(errors="replace").count("partitions assigned")
        for path in group.logs
        if path.exists()
    )
    waits = [min(w) for w in outputs.values()]
    return ChaosReport(
        records=len(want),
        lost=lost,
        unfinished=unfinished,
        duplicates=sum(duplicated.values()),
        unexplained_duplicates=sorted(unexplained),
        kills=len(before_kills),
        stops=len(exit_codes) - len(group.members),
        exit_codes=exit_codes,
        rebalances=rebalances,
        longest_wait_s=max(waits, default=0.0),
        max_lag=max_lag,
        seconds=seconds,
        duplicates_per_kill=per_kill,
    )
