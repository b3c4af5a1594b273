"""What the worker does when the consumer group moves its partitions.

Revoked (a rebalance, or leaving the group at shutdown): publish the batches being scored, wait
for their acknowledgements, commit what the ledger allows, and forget the rest; the next owner
consumes it again. Lost (an eviction: the loop did not poll within max_poll_interval_ms): the
group has given the partitions away already, so nothing is committed; what was not committed
is consumed again. Waits keep to the worker's time budget: drain_timeout_s in a rebalance,
what is left of the shutdown when leaving the group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kafka import AsyncConsumerRebalanceListener
from kafka.structs import TopicPartition

from streams.worker.acks import AckTracker
from streams.worker.delivery import UnsendableError
from streams.worker.state import WorkerState

logger = logging.getLogger(__name__)


class PartitionListener(AsyncConsumerRebalanceListener):
    """kafka-python 3 calls the listener on its I/O thread while the worker's thread waits in
    poll(); blocking consumer calls are refused there, so commits are awaited instead."""

    def __init__(
        self,
        *,
        acks: AckTracker,
        state: WorkerState,
        publish_in_flight: Callable[[], None],
        drop_buffered: Callable[[set[TopicPartition]], None],
        time_left: Callable[[], float],
    ) -> None:
        self._acks = acks
        self._state = state
        self._publish_in_flight = publish_in_flight
        self._drop_buffered = drop_buffered
        self._time_left = time_left

    async def on_partitions_revoked(self, revoked: Any) -> None:
        revoked = set(revoked)
        try:
            self._publish_in_flight()
            self._acks.await_acks(time.monotonic() + self._time_left())
        except UnsendableError:
            logger.error("rebalance: an unsendable record; its batch is left uncommitted")
        await self._acks.revoke(revoked, timeout_s=self._time_left())
        self._forget(revoked, "revoked")

    async def on_partitions_lost(self, lost: Any) -> None:
        lost = set(lost)
        self._acks.forget(lost)
        self._forget(lost, "lost (evicted from the group)")

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._state.assigned = set(assigned)
        self._state.group_joined = True
        logger.info("partitions assigned: %s", sorted(str(tp) for tp in assigned))

    def _forget(self, partitions: set[TopicPartition], how: str) -> None:
        self._drop_buffered(partitions)
        self._state.assigned = self._state.assigned - partitions
        self._state.group_joined = bool(self._state.assigned)
        if partitions:
            logger.info("partitions %s: %s", how, sorted(str(tp) for tp in partitions))
