"""The production error policy: what happens to a send that fails.

Every send goes through `ResultPublisher`, which turns an exception raised by `send()` itself
into a failed send like any other. The `Outbox` watches the sends of every published batch and
classifies each failure:

- temporary (a Kafka error marked retriable: timeouts, leader moves): sent again after a backoff
  that doubles, up to `send_retries` times; `retrying` tells the worker to pause consuming;
- permanent (too large, invalid, not authorized, or retries used up): the input record goes to
  the dead-letter topic as a trimmed copy with reason `unsendable`, once, even when its alert
  and its score both fail;
- a trimmed copy that fails as well: `on_unsendable` decides: `fail` raises `UnsendableError`
  (the worker stops without committing the record), `skip` counts it and lets the batch go.

A batch comes out of `reap()` once every one of its sends is acknowledged (or skipped); only
then does the ledger let its offsets be committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka.errors import KafkaError

from streams.config import StreamConfig
from streams.worker.dead_letters import H_ERROR
from streams.worker.metrics import UNSENDABLE
from streams.worker.publish import Outgoing, PublishedBatch, ResultPublisher

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0


class UnsendableError(RuntimeError):
    """A record whose outputs and dead-letter copy both failed, under on_unsendable: fail."""


def is_temporary(exc: BaseException) -> bool:
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


class _Skipped:
    """Stands in for a send given up under on_unsendable: skip."""

    is_done = True

    def failed(self) -> bool:
        return False


@dataclass
class _Batch:
    batch_id: int
    published: PublishedBatch
    checked: int = 0
    attempts: dict[int, int] = field(default_factory=dict)
    retry_at: dict[int, float] = field(default_factory=dict)
    copies: set[int] = field(default_factory=set)  # sends that are already unsendable copies
    copied: set[int] = field(default_factory=set)  # records (batch index) that have a copy


class Outbox:
    def __init__(
        self,
        *,
        publisher: ResultPublisher,
        config: StreamConfig,
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        self._publisher = publisher
        self._config = config
        self._on_error = on_error
        self._batches: dict[int, _Batch] = {}

    def add(self, batch_id: int, published: PublishedBatch) -> None:
        self._batches[batch_id] = _Batch(batch_id, published)

    def keep_only(self, tracked: Callable[[int], bool]) -> None:
        """Forget batches the ledger no longer tracks (their partitions were revoked)."""
        self._batches = {i: b for i, b in self._batches.items() if tracked(i)}

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def retrying(self) -> bool:
        return any(batch.retry_at for batch in self._batches.values())

    def reap(self) -> list[tuple[int, PublishedBatch]]:
        """Batches whose sends are all acknowledged now (taken out of the outbox)."""
        done = []
        for batch in list(self._batches.values()):
            if self._settle(batch):
                del self._batches[batch.batch_id]
                done.append((batch.batch_id, batch.published))
        return done

    def _settle(self, batch: _Batch) -> bool:
        futures = batch.published.futures
        if batch.retry_at:
            now = time.monotonic()
            for i, at in list(batch.retry_at.items()):
                if at <= now:
                    del batch.retry_at[i]
                    futures[i] = self._publisher.resend(batch.published.messages[i])
        while batch.checked < len(futures):
            future = futures[batch.checked]
            if not future.is_done:
                return False
            if future.failed():
                self._failed(batch, batch.checked, future.exception)
                continue  # look at its replacement
            batch.checked += 1
        return True

    def _failed(self, batch: _Batch, i: int, exc: BaseException) -> None:
        self._on_error("produce", exc)
        published = batch.published
        dlq = self._publisher.dlq_topic
        message: Outgoing = published.messages[i]
        attempt = batch.attempts.get(i, 0)
        if is_temporary(exc) and attempt < self._config.send_retries:
            batch.attempts[i] = attempt + 1
            backoff = min(self._config.retry_backoff_ms / 1000.0 * 2**attempt, _MAX_BACKOFF_S)
            batch.retry_at[i] = time.monotonic() + backoff
            published.futures[i] = _Waiting()
            logger.warning(
                "send to %s failed (%s); retry %d in %.1f s",
                message.topic,
                exc,
                attempt + 1,
                backoff,
            )
            return
        if i in batch.copies or not message.sources:
            self._give_up(batch, i, message, exc)
            return
        logger.error(
            "records %s of %s cannot be sent to %s (%s: %s); dead-lettering trimmed copies",
            list(message.sources)[:5],
            published.records[message.sources[0]].topic,
            message.topic,
            type(exc).__name__,
            exc,
        )
        # A dead letter that could not be sent is replaced by its trimmed copy: it counts as
        # unsendable, not under its first reason.
        first_reason = dict(message.headers or ()).get(H_ERROR) if message.topic == dlq else None
        if first_reason is not None and first_reason.decode() in published.dead_letter_reasons:
            published.dead_letter_reasons.remove(first_reason.decode())
        # An anomaly's alert and score are the same size: when both fail, one copy is enough.
        sources = [j for j in message.sources if j not in batch.copied]
        batch.copied.update(sources)
        if not sources:
            published.futures[i] = _Skipped()  # its record is dead-lettered already
            return
        copies = [
            self._publisher.unsendable_copy(published.records[j], exc, first_reason)
            for j in sources
        ]
        for n, (copy, future) in enumerate(copies):
            k = i if n == 0 else len(published.futures)
            if n == 0:
                published.futures[i], published.messages[i] = future, copy
            else:
                published.futures.append(future)
                published.messages.append(copy)
            batch.copies.add(k)
            batch.attempts.pop(k, None)
            published.dead_letter_reasons.append(UNSENDABLE)

    def _give_up(self, batch: _Batch, i: int, message: Outgoing, exc: BaseException) -> None:
        what = f"a dead-letter copy for {message.topic} failed too ({type(exc).__name__}: {exc})"
        if self._config.on_unsendable == "fail":
            raise UnsendableError(f"{what}; on_unsendable is fail: stopping without committing")
        self._on_error("skipped", exc)
        logger.error("%s; on_unsendable is skip: its record is committed without it", what)
        batch.published.futures[i] = _Skipped()
        if i in batch.copies and UNSENDABLE in batch.published.dead_letter_reasons:
            batch.published.dead_letter_reasons.remove(UNSENDABLE)


class _Waiting:
    """Stands in for a send waiting for its retry."""

    is_done = False

    def failed(self) -> bool:
        return False


def unacked_bytes(published: PublishedBatch) -> int:
    return sum(len(m.value or b"") for m in published.messages)
