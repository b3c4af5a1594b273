"""The worker's delivery bookkeeping, without Kafka: which consumed records are acknowledged,
what may be committed.

A batch is opened when the worker cuts it from what poll() returned (its offset range per
partition) and acknowledged once the broker has acknowledged every output of every record in
it (score, alert or dead letter). The commit position of a partition only moves over a prefix of
acknowledged batches, so it never passes a record whose output is still outstanding, whatever
the order of the acks. Partitions are any hashable key (the worker uses TopicPartition).

The rule this module exists for: *no committed offset ever passes a record whose output is not
acknowledged*. The worker asks `committable()` what to commit, on its timer, on a rebalance and
at shutdown alike, so no path can skip a batch whose publishing failed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

Key = Hashable
Ranges = Mapping[Key, tuple[int, int]]  # partition -> (first offset, last offset + 1)


@dataclass
class _Batch:
    ranges: dict[Key, tuple[int, int]]
    records: int
    nbytes: int
    queued: int = 0  # partition queues still holding it
    acknowledged: bool = False


@dataclass
class OffsetLedger:
    """Batches in flight and the safe commit position of every partition the worker owns."""

    _batches: dict[int, _Batch] = field(default_factory=dict)
    _queues: dict[Key, deque[int]] = field(default_factory=dict)  # open batch ids, oldest first
    _position: dict[Key, int] = field(default_factory=dict)  # everything below is acknowledged
    _committed: dict[Key, int] = field(default_factory=dict)
    _next_id: int = 0
    unacked_records: int = 0
    unacked_bytes: int = 0  # of the records, and of their outputs once sent

    # -- consuming -------------------------------------------------------------------------

    def consumed_from(self, key: Key, offset: int) -> None:
        """The first offset the worker holds for a partition it did not track yet (from the
        group's committed offset, or the reset policy). Later calls for it change nothing."""
        self._position.setdefault(key, offset)
        self._queues.setdefault(key, deque())

    def open(self, ranges: Ranges, *, records: int, nbytes: int = 0) -> int:
        """A batch cut from consumed records; offsets follow the partition's earlier batches.
        Returns its id, for `acknowledge`."""
        batch_id = self._next_id
        self._next_id += 1
        batch = _Batch(ranges=dict(ranges), records=records, nbytes=nbytes)
        self._batches[batch_id] = batch
        for key, (first, end) in batch.ranges.items():
            if end <= first:
                raise ValueError(f"empty offset range {first}..{end} for {key!r}")
            position = self._position.setdefault(key, first)
            queue = self._queues.setdefault(key, deque())
            latest = self._batches[queue[-1]].ranges[key][1] if queue else position
            if first < latest:
                raise ValueError(
                    f"batch at {first} overlaps an earlier one (to {latest}) of {key!r}"
                )
            queue.append(batch_id)
            batch.queued += 1
        self.unacked_records += records
        self.unacked_bytes += nbytes
        return batch_id

    def add_bytes(self, batch_id: int, nbytes: int) -> None:
        """The batch's outputs were sent: their bytes count as unacknowledged until it is."""
        batch = self._batches.get(batch_id)
        if batch is not None and not batch.acknowledged:
            batch.nbytes += nbytes
            self.unacked_bytes += nbytes

    def acknowledge(self, batch_id: int) -> None:
        """Every output of the batch is acknowledged: positions move over it once every older
        batch of the same partition is acknowledged too. Unknown ids (a batch dropped by a
        revoke) are ignored."""
        batch = self._batches.get(batch_id)
        if batch is None or batch.acknowledged:
            return
        batch.acknowledged = True
        self.unacked_records -= batch.records
        self.unacked_bytes -= batch.nbytes
        for key in batch.ranges:
            queue = self._queues[key]
            while queue and self._batches[queue[0]].acknowledged:
                done_id = queue.popleft()
                done = self._batches[done_id]
                self._position[key] = done.ranges[key][1]
                done.queued -= 1
                if done.queued == 0:
                    del self._batches[done_id]

    # -- committing ------------------------------------------------------------------------

    @property
    def open_batches(self) -> int:
        return sum(1 for b in self._batches.values() if not b.acknowledged)

    def has_work(self) -> bool:
        return any(not b.acknowledged for b in self._batches.values())

    def position(self, key: Key) -> int | None:
        """The offset up to which (exclusive) every record of `key` is acknowledged."""
        return self._position.get(key)

    def committable(self, keys: Iterable[Key] | None = None) -> dict[Key, int]:
        """Positions ahead of what was committed: what may be committed now."""
        wanted = self._position if keys is None else {k: None for k in keys}
        return {
            key: self._position[key]
            for key in wanted
            if key in self._position and self._position[key] != self._committed.get(key)
        }

    def mark_committed(self, offsets: Mapping[Key, int]) -> None:
        """The broker accepted a commit of `offsets` (taken from `committable`)."""
        for key, offset in offsets.items():
            if key in self._position:
                if offset > self._position[key]:
                    raise ValueError(f"commit {offset} of {key!r} passes {self._position[key]}")
                # Commits are acknowledged asynchronously: a late answer to an older one
                # must not move the mark back.
                self._committed[key] = max(offset, self._committed.get(key, offset))

    def committed(self, key: Key) -> int | None:
        return self._committed.get(key)

    # -- failures and rebalances -----------------------------------------------------------

    def revoke(self, keys: Iterable[Key]) -> None:
        """Forget partitions that moved to another worker (after committing `committable`).
        Their records in open batches are the next owner's to consume again; a batch that
        spans kept partitions stays open for those."""
        keys = set(keys)
        for key in keys:
            self._position.pop(key, None)
            self._committed.pop(key, None)
            for batch_id in self._queues.pop(key, ()):
                batch = self._batches[batch_id]
                del batch.ranges[key]
                batch.queued -= 1
        for batch_id, batch in list(self._batches.items()):
            if batch.queued == 0:
                if not batch.acknowledged:
                    self.unacked_records -= batch.records
                    self.unacked_bytes -= batch.nbytes
                del self._batches[batch_id]

    def tracks(self, batch_id: int) -> bool:
        """Whether the batch still counts (not dropped by a revoke)."""
        return batch_id in self._batches
