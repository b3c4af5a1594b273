"""The worker core: poll, decode, batch, score, publish, acknowledge, commit.

Read it in the order a record travels (docs/delivery.md lists the path): `loop.Worker` polls and
cuts batches, `codec` decodes them, `scoring` hands them to the model, `publish` builds the
outputs, `acks` sends them and commits the offsets their acknowledgements cover (`ledger`).
Nothing here imports the model lifecycle (streams/lifecycle/): it plugs in through
`loop.ModelSwaps`.
"""

from streams.worker.loop import Worker
from streams.worker.state import WorkerState

__all__ = ["Worker", "WorkerState"]
