"""The offset ledger (streams.worker.ledger): unit tests, and a hypothesis state machine that drives
it the way the worker does (poll, cut batches, acks in any order, a worker that stops on a send
that fails for good and is restarted, revokes and re-assignments, commits) and checks after
every step that no committed offset passes a record whose output is not acknowledged."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from streams.worker.ledger import OffsetLedger


def test_commit_position_waits_for_the_oldest_batch() -> None:
    ledger = OffsetLedger()
    first = ledger.open({"p": (0, 100)}, records=100)
    second = ledger.open({"p": (100, 200)}, records=100)
    ledger.acknowledge(second)
    assert ledger.committable() == {"p": 0}  # nothing below 0 is missing, nothing above is safe
    assert ledger.unacked_records == 100
    ledger.acknowledge(first)
    assert ledger.committable() == {"p": 200}
    ledger.mark_committed({"p": 200})
    assert ledger.committable() == {} and not ledger.has_work()


def test_a_batch_spanning_partitions_moves_each_independently() -> None:
    ledger = OffsetLedger()
    a = ledger.open({"p": (0, 5), "q": (10, 15)}, records=10)
    b = ledger.open({"q": (15, 20)}, records=5)
    ledger.acknowledge(b)
    assert ledger.committable() == {"p": 0, "q": 10}
    ledger.acknowledge(a)
    assert ledger.committable() == {"p": 5, "q": 20}


def test_output_bytes_count_until_their_batch_is_acknowledged() -> None:
    ledger = OffsetLedger()
    batch = ledger.open({"p": (0, 10)}, records=10, nbytes=100)
    ledger.add_bytes(batch, 40)
    assert ledger.unacked_bytes == 140
    ledger.acknowledge(batch)
    ledger.add_bytes(batch, 40)  # late: the batch is settled, nothing to count
    assert ledger.unacked_bytes == 0 and ledger.unacked_records == 0


def test_revoke_forgets_partitions_and_keeps_batches_of_the_others() -> None:
    ledger = OffsetLedger()
    shared = ledger.open({"p": (0, 5), "q": (0, 5)}, records=10)
    ledger.revoke({"p"})
    assert ledger.tracks(shared)
    ledger.acknowledge(shared)
    assert ledger.committable() == {"q": 5}
    ledger.revoke({"q"})
    assert ledger.committable() == {} and not ledger.tracks(shared)


def test_an_overlapping_batch_and_a_commit_past_the_position_are_refused() -> None:
    ledger = OffsetLedger()
    ledger.open({"p": (0, 10)}, records=10)
    with pytest.raises(ValueError, match="overlaps"):
        ledger.open({"p": (5, 15)}, records=10)
    with pytest.raises(ValueError, match="passes"):
        ledger.mark_committed({"p": 10})


def test_late_acks_of_revoked_batches_change_nothing() -> None:
    ledger = OffsetLedger()
    dropped = ledger.open({"p": (0, 10)}, records=10, nbytes=100)
    assert ledger.unacked_bytes == 100
    ledger.revoke({"p"})
    ledger.acknowledge(dropped)
    ledger.add_bytes(dropped, 10)
    assert ledger.committable() == {} and ledger.unacked_records == ledger.unacked_bytes == 0


PARTITIONS = ("p0", "p1", "p2")


class WorkerModel(RuleBasedStateMachine):
    """The worker's use of the ledger against a model broker: logs of contiguous offsets, a
    committed offset per partition, and the set of records whose outputs were acknowledged."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = OffsetLedger()
        self.broker_committed = dict.fromkeys(PARTITIONS, 0)
        self.acked_outputs: dict[str, set[int]] = {p: set() for p in PARTITIONS}
        self.assigned = set(PARTITIONS)
        self.fetch = dict.fromkeys(PARTITIONS, 0)
        self.buffer: list[tuple[str, int]] = []
        self.batches: dict[int, list[tuple[str, int]]] = {}  # open batches: id -> records
        self.sizes: dict[int, int] = {}  # records a batch held when opened

    @rule(partition=st.sampled_from(PARTITIONS), n=st.integers(1, 5))
    def poll(self, partition: str, n: int) -> None:
        if partition not in self.assigned:
            return
        first = self.fetch[partition]
        self.ledger.consumed_from(partition, first)
        self.buffer.extend((partition, first + i) for i in range(n))
        self.fetch[partition] = first + n

    @precondition(lambda self: self.buffer)
    @rule(n=st.integers(1, 8))
    def cut_batch(self, n: int) -> None:
        records, self.buffer = self.buffer[:n], self.buffer[n:]
        ranges: dict[str, tuple[int, int]] = {}
        for partition, offset in records:
            first, _ = ranges.get(partition, (offset, offset))
            ranges[partition] = (first, offset + 1)
        batch_id = self.ledger.open(ranges, records=len(records))
        self.batches[batch_id] = records
        self.sizes[batch_id] = len(records)

    @precondition(lambda self: self.batches)
    @rule(data=st.data())
    def acknowledge(self, data: st.DataObject) -> None:
        batch_id = data.draw(st.sampled_from(sorted(self.batches)))
        for partition, offset in self.batches.pop(batch_id):
            self.acked_outputs[partition].add(offset)
        self.ledger.acknowledge(batch_id)

    @precondition(lambda self: self.batches)
    @rule(data=st.data())
    def some_outputs_acked_then_a_send_fails_for_good(self, data: st.DataObject) -> None:
        """Part of a batch's outputs reached the broker, then one failed for good (on_unsendable:
        fail): the worker stops without committing, and its successor (a new ledger) consumes
        again from the broker's committed offsets."""
        batch_id = data.draw(st.sampled_from(sorted(self.batches)))
        records = self.batches[batch_id]
        for partition, offset in records[: data.draw(st.integers(0, len(records) - 1))]:
            self.acked_outputs[partition].add(offset)
        self.ledger = OffsetLedger()
        self.fetch.update({p: self.broker_committed[p] for p in self.assigned})
        self.buffer = []
        self.batches = {}

    @rule()
    def commit(self) -> None:
        offsets = {p: o for p, o in self.ledger.committable().items() if p in self.assigned}
        self.broker_committed.update(offsets)
        self.ledger.mark_committed(offsets)

    @precondition(lambda self: self.assigned)
    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        """Eager or cooperative: commit what is safe for the revoked partitions, forget them."""
        revoked = set(data.draw(st.sets(st.sampled_from(sorted(self.assigned)), min_size=1)))
        offsets = self.ledger.committable(revoked)
        self.broker_committed.update(offsets)
        self.ledger.mark_committed(offsets)
        self.ledger.revoke(revoked)
        self.assigned -= revoked
        self.buffer = [(p, o) for p, o in self.buffer if p not in revoked]
        for batch_id in list(self.batches):
            kept = [(p, o) for p, o in self.batches[batch_id] if p not in revoked]
            if kept:
                self.batches[batch_id] = kept
            else:
                del self.batches[batch_id]

    @rule(partition=st.sampled_from(PARTITIONS))
    def assign(self, partition: str) -> None:
        """A partition assigned again starts at the committed offset. That holds for the real
        worker only because it seeks a forgotten partition back to its acknowledged prefix
        (kafka-python keeps the position of a partition an eager rebalance gives back): the
        property test of tests/streams/worker/test_worker_rebalance.py checks it on the real
        loop."""
        if partition not in self.assigned:
            self.assigned.add(partition)
            self.fetch[partition] = self.broker_committed[partition]

    @invariant()
    def no_commit_passes_an_unacknowledged_record(self) -> None:
        for partition, committed in self.broker_committed.items():
            missing = set(range(committed)) - self.acked_outputs[partition]
            assert not missing, (partition, committed, sorted(missing)[:5])

    @invariant()
    def acking_everything_lets_commits_reach_the_end_of_the_open_batches(self) -> None:
        ends: dict[str, int] = {}
        for records in self.batches.values():
            for partition, offset in records:
                ends[partition] = max(ends.get(partition, 0), offset + 1)
        for partition, end in ends.items():
            position = self.ledger.position(partition)
            assert position is not None and position <= end
        # A batch counts whole until it is acknowledged or all its partitions are revoked.
        assert self.ledger.unacked_records == sum(self.sizes[i] for i in self.batches)


TestWorkerModel = WorkerModel.TestCase
TestWorkerModel.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
