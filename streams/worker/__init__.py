"""The worker core: poll, decode, batch, score, publish, acknowledge, commit.

Read it in the order a record travels (docs/delivery.md tables the path): `loop.Worker` polls
and cuts batches (streams/codec.py decodes them) and hands each to `scoring` and to the batches'
owner, `delivery.Delivery`, which publishes it once scored (`publish` builds the outputs, `batch`
sends and settles them) and commits the offsets the ledger allows (`ledger`; `transactions`
under exactly_once). Nothing here imports the model lifecycle (streams/lifecycle/): it plugs in
through `loop.ModelSwaps`.
"""

from streams.worker.loop import Worker
from streams.worker.state import WorkerState

__all__ = ["Worker", "WorkerState"]
