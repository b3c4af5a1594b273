"""One batch in flight, from the moment it is cut until its outputs are all acknowledged, and
the production error policy for its sends.

Every send goes through `ResultPublisher.send`, which turns an exception raised by `send()`
itself into a failed send like any other. `InFlightBatch.settle` sorts each failure
(streams/worker/output_refusals.py):

- failed only because another record was refused (a batch-mate): sent again at once;
- temporary (a Kafka error marked retriable: timeouts, leader moves): sent again after a backoff
  that doubles, up to `send_retries` times; `retrying` tells the owner to pause consuming;
- refused (too large for its topic, a null key for a compacted one, a timestamp out of range,
  not authorized, ...; or retries used up): replaced, in one logged line and counted:
  - a frame (of alerts or scores) too large: by one message per line (later frames are cut
    smaller);
  - an alert or a score: by its record's dead letter, a trimmed copy with reason
    `unsendable`, once per record even when its alert and its score both fail;
  - a dead letter: by its trimmed copy, or a bare one (no input value) where the topic
    refused it as too large and trimming does not make it smaller; by none where the topic
    refuses whatever is sent to it (not authorized, timestamps);
- nothing left to send in its place: `on_unsendable` decides: `fail` raises `UnsendableError`
  (the worker stops without committing the record), `skip` counts it and lets the batch go.

Under exactly_once a send the broker answered with a failure dooms the transaction: `settle`
raises TransactionFailedError, the owner has every batch `remember_refusals` and aborts
(delivery.py); the redo then fails the remembered outputs at once, without sending them
(`RefusedBefore`), so that their replacements go into the new transaction.
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
from streams.client_internals import failed_before_sending
from streams.codec import DecodedBatch
from streams.config import StreamConfig
from streams.worker.dead_letters import H_ERROR
from streams.worker.metrics import UNSENDABLE
from streams.worker.output_refusals import (
    TOPIC_REFUSAL_S,
    OutputRefusals,
    Refusal,
    failed_with_another,
    refusal,
)
from streams.worker.publish import FailedSend, Outgoing, Outputs, ResultPublisher
from streams.worker.scoring import PendingBatch

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0
_NAMED_OFFSETS = 5  # a log line names at most this many input offsets


class UnsendableError(RuntimeError):
    """A record whose outputs and dead-letter copy both failed, under on_unsendable: fail."""


class TransactionFailedError(RuntimeError):
    """exactly_once: a send failed in a way that leaves the transaction unusable: abort it."""


class RefusedBefore(FailedSend):
    """An output the broker refused in an aborted transaction, not sent again, or one to a
    topic that refused any output (`for_topic`), not tried: its replacement is sent instead."""

    def __init__(self, exception: BaseException, *, for_topic: bool = False) -> None:
        super().__init__(exception)
        self.for_topic = for_topic


def is_about_the_record(exc: BaseException) -> bool:
    """Refused by the client before it left (too large, no key nor value, bad headers): the
    transaction is untouched, so the record follows the dead-letter policy."""
    return isinstance(exc, MessageSizeTooLargeError | TypeError | ValueError)


def _outside_the_transaction(future: Any) -> bool:
    """A failed send that never reached the broker and leaves the transaction as it was: refused
    by send() itself for what the record is, by its topic's metadata before the producer took
    it, or not sent at all (RefusedBefore)."""
    if isinstance(future, FailedSend):
        return isinstance(future, RefusedBefore) or is_about_the_record(future.exception)
    return failed_before_sending(future)


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
    # the owner's, shared by its batches
    refusals: OutputRefusals = field(default_factory=OutputRefusals)
    outputs: Outputs | None = None  # once scored
    futures: list[Any] = field(default_factory=list)
    sent_at: float = 0.0
    checked: int = 0  # futures[:checked] are acknowledged
    attempts: dict[int, int] = field(default_factory=dict)
    retry_at: dict[int, float] = field(default_factory=dict)
    # records (batch index) with a dead-letter copy -> the reason of their first dead letter
    copied: dict[int, bytes | None] = field(default_factory=dict)

    @property
    def scored(self) -> bool:
        return self.scoring is None or self.scoring.done()

    @property
    def retrying(self) -> bool:
        return bool(self.retry_at)

    def send(self, outputs: Outputs) -> None:
        self.outputs = outputs
        self.futures = [self._send(m) for m in outputs.messages]
        self.sent_at = time.time()

    def _send(self, message: Outgoing) -> Any:
        refusals = self.refusals
        if refusals.holds_outputs:
            exc = refusals.refused_before(self.records, message)
            if exc is not None:
                return RefusedBefore(exc)
            exc = refusals.topic_refused(message.topic)
            if exc is not None:
                return RefusedBefore(exc, for_topic=True)
        future = self.publisher.send(message)
        if future.is_done and future.failed():
            # Refused at once (by send() itself, or a topic whose metadata the ACLs deny: each
            # such send waits for a metadata answer): the rest of the batch learns it now.
            exc, topic = future.exception, message.topic
            refused = refusal(exc)
            if refused and refused.topic_wide and not failed_with_another(future, exc, topic):
                refusals.refuse_topic(topic, exc)
        return future

    def settle(
        self,
        config: StreamConfig,
        on_error: Callable[[str, BaseException], None],
        *,
        transactional: bool = False,
    ) -> bool:
        """Retry what is due, handle what failed; True once every send is acknowledged (or
        skipped). Raises UnsendableError under on_unsendable: fail, and (`transactional`)
        TransactionFailedError for a send that reached the broker and failed."""
        futures = self.futures
        if self.retry_at:
            now = time.monotonic()
            assert self.outputs is not None
            for i, at in list(self.retry_at.items()):
                if at <= now:
                    del self.retry_at[i]
                    futures[i] = self._send(self.outputs.messages[i])
        while self.checked < len(futures):
            future = futures[self.checked]
            if not future.is_done:
                return False
            if future.failed():
                exc = future.exception
                if not isinstance(future, RefusedBefore):
                    on_error("produce", exc)
                if transactional and not _outside_the_transaction(future):
                    raise TransactionFailedError(f"{type(exc).__name__}: {exc}") from exc
                self._failed(self.checked, future, config, on_error)
                continue  # look at its replacement
            self.checked += 1
        return True

    def remember_refusals(self) -> None:
        """exactly_once, before the owner aborts the transaction: what the broker refused, kept
        in `refusals` by input record so that the redo replaces it; one log line and one count
        each."""
        assert self.outputs is not None
        for future, message in zip(self.futures, self.outputs.messages, strict=False):
            if not (future.is_done and future.failed()) or isinstance(future, RefusedBefore):
                continue
            exc = future.exception
            refused = refusal(exc)
            if refused is None or failed_with_another(future, exc, message.topic):
                continue
            for j in message.sources:
                self.refusals.remember(self.records[j], message.topic, message.form, exc)
            # Learnt now, not at the redo: the batches still to be cut are sent with it in
            # mind, so one refusal costs one abort.
            self.refusals.learn(message, refused)
            self._report(message, refused, "aborting the transaction; the redo replaces it")

    def _failed(
        self,
        i: int,
        future: Any,
        config: StreamConfig,
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        outputs = self.outputs
        assert outputs is not None
        message: Outgoing = outputs.messages[i]
        exc = future.exception
        attempt = self.attempts.get(i, 0)
        if attempt < config.send_retries and failed_with_another(future, exc, message.topic):
            self.attempts[i] = attempt + 1
            self.futures[i] = self._send(message)
            return
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
        refused = refusal(exc) or Refusal("other", False, exc)  # also: retries used up
        if not isinstance(future, RefusedBefore):  # learnt from the broker's own answer only
            self.refusals.learn(message, refused)
        replacements = self._replacements(message, refused)
        if replacements is None:
            self._report(message, refused, "nothing left to send in its place", future)
            self._give_up(i, message, exc, config, on_error)
            return
        if not replacements:
            self._report(message, refused, "its record is dead-lettered already", future)
            self.futures[i] = _Skipped()
            return
        what = {"line": "one message per line", "bare": "a bare dead letter (no value)"}
        remedy = what.get(replacements[0].form, "a trimmed dead-letter copy")
        self._report(message, refused, f"sending {remedy} instead", future)
        self.attempts.pop(i, None)
        for n, replacement in enumerate(replacements):
            sent = self._send(replacement)
            if n == 0:
                self.futures[i], outputs.messages[i] = sent, replacement
            else:
                self.futures.append(sent)
                outputs.messages.append(replacement)

    def _replacements(self, message: Outgoing, refused: Refusal) -> list[Outgoing] | None:
        """What replaces a refused message; None when nothing is left to try."""
        outputs, publisher = self.outputs, self.publisher
        assert outputs is not None
        records = outputs.records
        if message.topic != publisher.dlq_topic:
            if refused.too_large and len(message.sources) > 1:  # a frame
                return publisher.single_lines(records, message)
            if message.topic == publisher.alert_topic:
                outputs.n_alerts -= len(message.sources)
            # An anomaly's alert and score are the same size: when both fail, one copy is enough.
            sources = [j for j in message.sources if j not in self.copied]
            copies = []
            for j in sources:
                self.copied[j] = None
                copies.append(publisher.dead_letter_copy(records[j], refused.exc, None, source=j))
                outputs.dead_letter_reasons.append(UNSENDABLE)
            return copies
        if message.form == "bare" or refused.topic_wide:
            return None
        (j,) = message.sources
        if message.form == "output":
            # A dead letter that could not be sent is replaced by its trimmed copy: it counts
            # as unsendable, not under its first reason.
            first = dict(message.headers or ()).get(H_ERROR)
            self.copied[j] = first
            if first is not None and first.decode() in outputs.dead_letter_reasons:
                outputs.dead_letter_reasons.remove(first.decode())
            outputs.dead_letter_reasons.append(UNSENDABLE)
        first = self.copied.get(j)
        copy = publisher.dead_letter_copy(
            records[j], refused.exc, first, source=j, bare=message.form == "copy"
        )
        if refused.too_large and copy.size >= message.size:  # the topic's limit is unknown
            copy = publisher.dead_letter_copy(records[j], refused.exc, first, source=j, bare=True)
        return [copy]

    def _report(self, message: Outgoing, refused: Refusal, then: str, future: Any = None) -> None:
        """One line naming the input records, the output and why it was refused; counted."""
        assert self.outputs is not None
        publisher, exc = self.publisher, refused.exc
        if isinstance(future, RefusedBefore) and not future.for_topic:
            logger.info("%s: replaced as in the aborted transaction (%s)", message.topic, then)
            return
        if isinstance(future, RefusedBefore):
            then = f"not tried: the topic refused one within {TOPIC_REFUSAL_S:g} s; {then}"
        kind = (
            "dead letter"
            if message.topic == publisher.dlq_topic
            else "alert"
            if message.topic == publisher.alert_topic
            else "score"
        )
        self.refusals.count(kind.replace(" ", "_"), refused.reason)
        sources = [self.records[j] for j in message.sources]
        offsets = ",".join(str(r.offset) for r in sources[:_NAMED_OFFSETS])
        more = f" (+{len(sources) - _NAMED_OFFSETS} more)" if len(sources) > _NAMED_OFFSETS else ""
        logger.error(
            "%s/%d/%s%s: %s %s to %s (%d bytes) refused (%s: %s); %s",
            sources[0].topic,
            sources[0].partition,
            offsets,
            more,
            "its" if len(sources) == 1 else "their",
            kind if message.form == "output" else f"{kind} ({message.form})",
            message.topic,
            message.size,
            type(exc).__name__,
            exc,
            then,
        )

    def _give_up(
        self,
        i: int,
        message: Outgoing,
        exc: BaseException,
        config: StreamConfig,
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        what = f"a dead letter to {message.topic} failed ({type(exc).__name__}: {exc})"
        if config.on_unsendable == "fail":
            raise UnsendableError(f"{what}; on_unsendable is fail: stopping without committing")
        logger.error("%s; on_unsendable is skip: its record is committed without it", what)
        on_error("skipped", exc)
        self.futures[i] = _Skipped()
        assert self.outputs is not None
        reasons = self.outputs.dead_letter_reasons
        first = dict(message.headers or ()).get(H_ERROR, b"").decode()
        reason = first if message.form == "output" else UNSENDABLE
        if reason in reasons:
            reasons.remove(reason)


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
