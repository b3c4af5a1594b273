"""One batch in flight, from the moment it is cut until its outputs are all acknowledged, and
the production error policy for its sends.

Every send goes through `ResultPublisher.send`, which turns an exception raised by `send()`
itself into a failed send like any other. `InFlightBatch.settle` classifies each failure:

- temporary (a Kafka error marked retriable: timeouts, leader moves): sent again after a backoff
  that doubles, up to `send_retries` times; `retrying` tells the owner to pause consuming;
- permanent (too large, invalid, not authorized, or retries used up): the input record goes to
  the dead-letter topic as a trimmed copy with reason `unsendable`, once, even when its alert
  and its score both fail;
- a trimmed copy that fails as well: `on_unsendable` decides: `fail` raises `UnsendableError`
  (the worker stops without committing the record), `skip` counts it and lets the batch go.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kafka.errors import KafkaError, MessageSizeTooLargeError

from detector.config import IMAGE_PIXELS
from streams.codec import DecodedBatch
from streams.config import StreamConfig
from streams.worker.dead_letters import H_ERROR
from streams.worker.metrics import UNSENDABLE
from streams.worker.publish import Outgoing, Outputs, ResultPublisher
from streams.worker.scoring import PendingBatch

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0


class UnsendableError(RuntimeError):
    """A record whose outputs and dead-letter copy both failed, under on_unsendable: fail."""


class TransactionFailedError(RuntimeError):
    """exactly_once: a send failed in a way that leaves the transaction unusable: abort it."""


def is_about_the_record(exc: BaseException) -> bool:
    """Refused by the client before it left (too large, no key nor value, bad headers): the
    transaction is untouched, so the record follows the dead-letter policy."""
    return isinstance(exc, MessageSizeTooLargeError | TypeError | ValueError)


def is_temporary(exc: BaseException) -> bool:
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


class _Skipped:
    """Stands in for a send given up under on_unsendable: skip."""

    is_done = True

    def failed(self) -> bool:
        return False


class _Waiting:
    """Stands in for a send waiting for its retry."""

    is_done = False

    def failed(self) -> bool:
        return False


@dataclass(eq=False)
class InFlightBatch:
    """Records cut from the buffer, their decoded images and scoring, then their outputs and
    the state of every send."""

    batch_id: int
    records: list[Any]
    decoded: DecodedBatch
    scoring: PendingBatch | None
    publisher: ResultPublisher  # of the model that scores it: its outputs name that model
    polled_at: float  # time.time() when poll() returned the oldest records of the buffer
    cut_at: float  # time.time() when it was cut from the buffer
    outputs: Outputs | None = None  # once scored
    futures: list[Any] = field(default_factory=list)
    sent_at: float = 0.0
    checked: int = 0  # futures[:checked] are acknowledged
    attempts: dict[int, int] = field(default_factory=dict)
    retry_at: dict[int, float] = field(default_factory=dict)
    copies: set[int] = field(default_factory=set)  # sends that are already unsendable copies
    copied: set[int] = field(default_factory=set)  # records (batch index) that have a copy

    @property
    def scored(self) -> bool:
        return self.scoring is None or self.scoring.done()

    @property
    def retrying(self) -> bool:
        return bool(self.retry_at)

    def send(self, outputs: Outputs) -> None:
        self.outputs = outputs
        self.futures = [self.publisher.send(m) for m in outputs.messages]
        self.sent_at = time.time()

    def settle(
        self,
        config: StreamConfig,
        on_error: Callable[[str, BaseException], None],
        *,
        transactional: bool = False,
    ) -> bool:
        """Retry what is due, handle what failed; True once every send is acknowledged (or
        skipped). Raises UnsendableError under on_unsendable: fail, and (`transactional`)
        TransactionFailedError for a failure that is not about the record itself."""
        futures = self.futures
        if self.retry_at:
            now = time.monotonic()
            assert self.outputs is not None
            for i, at in list(self.retry_at.items()):
                if at <= now:
                    del self.retry_at[i]
                    futures[i] = self.publisher.send(self.outputs.messages[i])
        while self.checked < len(futures):
            future = futures[self.checked]
            if not future.is_done:
                return False
            if future.failed():
                on_error("produce", future.exception)
                if transactional and not is_about_the_record(future.exception):
                    raise TransactionFailedError(
                        f"{type(future.exception).__name__}: {future.exception}"
                    )
                self._failed(self.checked, future.exception, config, on_error)
                continue  # look at its replacement
            self.checked += 1
        return True

    def _failed(
        self,
        i: int,
        exc: BaseException,
        config: StreamConfig,
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        outputs = self.outputs
        assert outputs is not None
        message: Outgoing = outputs.messages[i]
        attempt = self.attempts.get(i, 0)
        if is_temporary(exc) and attempt < config.send_retries:
            self.attempts[i] = attempt + 1
            backoff = min(config.retry_backoff_ms / 1000.0 * 2**attempt, _MAX_BACKOFF_S)
            self.retry_at[i] = time.monotonic() + backoff
            self.futures[i] = _Waiting()
            logger.warning(
                "send to %s failed (%s); retry %d in %.1f s",
                message.topic,
                exc,
                attempt + 1,
                backoff,
            )
            return
        if i in self.copies or not message.sources:
            self._give_up(i, message, exc, config)
            on_error("skipped", exc)
            return
        logger.error(
            "records %s of %s cannot be sent to %s (%s: %s); dead-lettering trimmed copies",
            list(message.sources)[:5],
            outputs.records[message.sources[0]].topic,
            message.topic,
            type(exc).__name__,
            exc,
        )
        # A dead letter that could not be sent is replaced by its trimmed copy: it counts as
        # unsendable, not under its first reason.
        is_dead_letter = message.topic == self.publisher.dlq_topic
        first_reason = dict(message.headers or ()).get(H_ERROR) if is_dead_letter else None
        if first_reason is not None and first_reason.decode() in outputs.dead_letter_reasons:
            outputs.dead_letter_reasons.remove(first_reason.decode())
        # An anomaly's alert and score are the same size: when both fail, one copy is enough.
        sources = [j for j in message.sources if j not in self.copied]
        self.copied.update(sources)
        if not sources:
            self.futures[i] = _Skipped()  # its record is dead-lettered already
            return
        for n, j in enumerate(sources):
            copy = self.publisher.unsendable_copy(outputs.records[j], exc, first_reason)
            future = self.publisher.send(copy)
            k = i if n == 0 else len(self.futures)
            if n == 0:
                self.futures[i], outputs.messages[i] = future, copy
            else:
                self.futures.append(future)
                outputs.messages.append(copy)
            self.copies.add(k)
            self.attempts.pop(k, None)
            outputs.dead_letter_reasons.append(UNSENDABLE)

    def _give_up(self, i: int, message: Outgoing, exc: BaseException, config: StreamConfig) -> None:
        what = f"a dead-letter copy for {message.topic} failed too ({type(exc).__name__}: {exc})"
        if config.on_unsendable == "fail":
            raise UnsendableError(f"{what}; on_unsendable is fail: stopping without committing")
        logger.error("%s; on_unsendable is skip: its record is committed without it", what)
        self.futures[i] = _Skipped()
        assert self.outputs is not None
        reasons = self.outputs.dead_letter_reasons
        if i in self.copies and UNSENDABLE in reasons:
            reasons.remove(UNSENDABLE)


def all_invalid(
    n: int, reason: str, exc: BaseException, errors: dict | None = None
) -> DecodedBatch:
    """Every record of a batch dead-lettered with `reason` (those already invalid keep theirs)."""
    detail = f"{type(exc).__name__}: {exc}"[:200]
    return DecodedBatch(
        images=np.empty((0, IMAGE_PIXELS), np.uint8),
        valid=np.zeros(n, dtype=bool),
        errors={i: (reason, detail) for i in range(n)} | dict(errors or {}),
    )
