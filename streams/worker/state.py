"""What /readyz and /healthz report about a worker: written by its loop, read by the HTTP
thread. Ready: the model is loaded, the broker reachable, the ACLs there let it consume (its
input topic and group), the group joined and stable (an
eviction for a stalled poll loop clears it at once) and the loop making progress. Alive: unless
the loop has had work (records in hand, batches being scored or sends outstanding) and made no
progress (a batch published or acknowledged) for liveness_timeout_s, or, while it runs, has not
come round at all for that long (an idle loop counts every turn as progress: one that stopped
turning is stuck inside a call)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class WorkerState:
    """What /readyz and /healthz report; written by the worker thread, read by the HTTP one."""

    model_loaded: Callable[[], bool] = lambda: False
    broker_connected: bool = False
    authorized: bool = True  # the broker lets it read its input and use its group (ACLs)
    group_joined: bool = False
    group_stable: Callable[[], bool] = lambda: True  # the coordinator's view, live
    assigned: set[Any] = field(default_factory=set)  # the TopicPartitions it owns
    liveness_timeout_s: float = 120.0
    has_work: bool = False
    loop_running: bool = False  # set by Worker.run; not before it (connecting) nor after it
    clock: Callable[[], float] = time.monotonic  # tests give their own
    progress_at: float = field(init=False)  # the clock's time of the last progress

    def __post_init__(self) -> None:
        self.progress_at = self.clock()

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        checks = {
            "model_loaded": self.model_loaded(),
            "broker_connected": self.broker_connected,
            "authorized": self.authorized,
            "group_joined": self.group_joined and self.group_stable(),
            "making_progress": self.liveness()[0],
        }
        return all(checks.values()), checks

    def liveness(self) -> tuple[bool, dict[str, float]]:
        """Alive unless no progress for liveness_timeout_s with work in hand or a running loop."""
        judged = self.has_work or self.loop_running
        stalled_s = self.clock() - self.progress_at if judged else 0.0
        return stalled_s <= self.liveness_timeout_s, {"stalled_s": round(stalled_s, 1)}

    def progressed(self, *, has_work: bool) -> None:
        self.has_work = has_work
        self.progress_at = self.clock()
