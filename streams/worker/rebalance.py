"""What the worker does when the consumer group moves its partitions.

Revoked (a rebalance, or leaving the group at shutdown): the batches' owner publishes what is
being scored, waits for the acknowledgements, commits the acknowledged prefix and forgets the
rest; the next owner consumes it again. Lost (an eviction: the loop did not poll within
max_poll_interval_ms): the group has given the partitions away already, so nothing is committed;
what was not committed is consumed again. Waits keep to the worker's time budget:
drain_timeout_s in a rebalance, what is left of the shutdown when leaving the group.
"""

from __future__ import annotations

import logging
from typing import Any

from kafka import AsyncConsumerRebalanceListener
from kafka.structs import TopicPartition

from streams.worker.delivery import Delivery
from streams.worker.state import WorkerState

logger = logging.getLogger(__name__)


class PartitionListener(AsyncConsumerRebalanceListener):
    """kafka-python 3 calls the listener on its I/O thread while the worker's thread waits in
    poll(); blocking consumer calls are refused there, so commits are awaited instead. It talks
    to the batches' owner and the worker's state only, never to the worker loop."""

    def __init__(self, *, delivery: Delivery, state: WorkerState) -> None:
        self._delivery = delivery
        self._state = state

    async def on_partitions_revoked(self, revoked: Any) -> None:
        revoked = set(revoked)
        await self._delivery.revoke(revoked)
        self._forget(revoked, "revoked")

    async def on_partitions_lost(self, lost: Any) -> None:
        lost = set(lost)
        self._delivery.lose(lost)
        self._forget(lost, "lost (evicted from the group)")

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._state.assigned = set(assigned)
        self._state.group_joined = True
        logger.info("partitions assigned: %s", sorted(str(tp) for tp in assigned))

    def _forget(self, partitions: set[TopicPartition], how: str) -> None:
        self._state.assigned = self._state.assigned - partitions
        self._state.group_joined = bool(self._state.assigned)
        if partitions:
            logger.info("partitions %s: %s", how, sorted(str(tp) for tp in partitions))
