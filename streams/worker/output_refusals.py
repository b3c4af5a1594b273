"""Outputs the broker (or the client) refuses, told apart from sends that failed only because
another record was refused, and what the worker learns from them (issue 27).

A refused output never halts a partition: its record's dead letter replaces it (batch.py), and
under exactly_once, where a refusal dooms the open transaction, the worker remembers it across
the abort so that the redo sends the replacement at once and never aborts twice on one output.

Refusals, by the metric label `reason` of vaewatch_outputs_refused_total:

- too_large: larger than the topic's max.message.bytes (or the producer's max_request_size);
- invalid_record: the topic refuses the record's form, e.g. a null key on a compacted topic;
- invalid_timestamp: outside the topic's message.timestamp.before/after.max.ms (a worker whose
  clock is off, a send that waited in the producer);
- not_authorized: an ACL denies writing to the topic;
- other: the rest of what a broker refuses for good (a policy, an unsupported format or
  compression), and what the client refuses before sending (a record with neither key nor
  value, a header it cannot encode).

`topic_wide` refusals (not_authorized, invalid_timestamp, a topic the broker will not take)
would refuse any record sent to that topic, so a dead letter refused that way goes straight to
stream.on_unsendable; the others leave a smaller or keyed copy a chance. For TOPIC_REFUSAL_S
after one, outputs to that topic are replaced without being tried: exactly_once would otherwise
abort every transaction that holds one (an alert topic the ACLs deny, a worker clock an hour
off), and at_least_once would send each in vain. Then one is tried again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka.errors import (
    InvalidRecordError,
    InvalidTimestampError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    TransactionAbortedError,
    UnsupportedCompressionTypeError,
    UnsupportedForMessageFormatError,
)
from kafka.structs import TopicPartition

from streams.client_internals import aborted_by_client

logger = logging.getLogger(__name__)

FRAME_BYTES = 256 * 1024  # largest frame of alerts or scores, until a topic refuses one
TOPIC_REFUSAL_S = 60.0

_REASONS: tuple[tuple[type[BaseException], str, bool], ...] = (
    # (exception, reason, topic_wide)
    (MessageSizeTooLargeError, "too_large", False),
    (RecordListTooLargeError, "too_large", False),
    (InvalidRecordError, "invalid_record", False),
    (InvalidTimestampError, "invalid_timestamp", True),
    (TopicAuthorizationFailedError, "not_authorized", True),
    (InvalidTopicError, "other", True),
    (PolicyViolationError, "other", True),
    (UnsupportedForMessageFormatError, "other", True),
    (UnsupportedCompressionTypeError, "other", True),
    (TypeError, "other", False),  # refused by send() itself: bad headers, a bad key type
    (ValueError, "other", False),  # ... neither key nor value, a topic name Kafka forbids
)


@dataclass(frozen=True)
class Refusal:
    """Why one output was refused."""

    reason: str
    topic_wide: bool
    exc: BaseException

    @property
    def too_large(self) -> bool:
        return self.reason == "too_large"


def refusal(exc: BaseException) -> Refusal | None:
    """The refusal `exc` stands for; None for a failure that is not one (temporary, caused by
    another record, the producer's own state)."""
    if isinstance(exc, InvalidRecordError) and "timestamp" in str(exc).lower():
        # kafka-python reports several refused records of one batch as InvalidRecordError,
        # each with the broker's own message ("Timestamp ... is out of range")
        return Refusal("invalid_timestamp", True, exc)
    if isinstance(exc, TypeError | ValueError) and "topic" in str(exc).lower():
        return Refusal("other", True, exc)  # send() refuses the topic's name: any record's
    for kind, reason, topic_wide in _REASONS:
        if isinstance(exc, kind):
            return Refusal(reason, topic_wide, exc)
    return None


def _named_topics(exc: TopicAuthorizationFailedError) -> set[str]:
    """kafka-python names the denied topic (a produce answer) or topics (adding partitions to a
    transaction, fetching metadata) in the exception's first argument."""
    named = exc.args[0] if exc.args else None
    if isinstance(named, str):
        return {named}
    return {t for t in named or () if isinstance(t, str)}


def failed_with_another(future: Any, exc: BaseException, topic: str) -> bool:
    """Whether a send failed only because another record was refused: a batch-mate (the broker
    names the refused records of a batch; kafka-python fails the others with a bare KafkaError),
    a batch kafka-python aborted with its transaction, or a send refused because the
    transaction had failed already. Such a send is not refused itself: it is sent again (at
    least once) or redone (exactly once)."""
    if isinstance(exc, TopicAuthorizationFailedError):
        return topic not in _named_topics(exc)  # every send to a denied topic is refused
    return (
        type(exc) is KafkaError
        or isinstance(exc, TransactionAbortedError)
        or aborted_by_client(future)
    )


Coordinates = tuple[str, int, int]  # input topic, partition, offset


@dataclass
class OutputRefusals:
    """What the broker refused, kept by the batches' owner (delivery.py) for as long as the
    records concerned are not committed: under exactly_once the refused outputs of an aborted
    transaction, by input record and (output topic, form), so that the redo replaces them at
    once; and, in both guarantees, the largest frame to build (alerts and scores), an eighth of
    each frame a topic refuses as too large. `on_refused(output, reason)` counts each refusal."""

    on_refused: Callable[[str, str], None] | None = None
    frame_bytes: int = FRAME_BYTES
    clock: Callable[[], float] = time.monotonic
    _outputs: dict[Coordinates, dict[tuple[str, str], BaseException]] = field(default_factory=dict)
    _topics: dict[str, tuple[BaseException, float]] = field(default_factory=dict)

    @property
    def holds_outputs(self) -> bool:
        return bool(self._outputs or self._topics)

    def refuse_topic(self, topic: str, exc: BaseException) -> None:
        """`topic` refused a send as it would refuse any (a topic_wide refusal)."""
        self._topics[topic] = (exc, self.clock() + TOPIC_REFUSAL_S)

    def topic_refused(self, topic: str) -> BaseException | None:
        """The topic-wide refusal of `topic` in the last TOPIC_REFUSAL_S, or None."""
        refused = self._topics.get(topic)
        if refused is None:
            return None
        if self.clock() >= refused[1]:
            del self._topics[topic]  # try it again
            return None
        return refused[0]

    def count(self, output: str, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(output, reason)

    def remember(self, record: Any, topic: str, form: str, exc: BaseException) -> None:
        key = (record.topic, record.partition, record.offset)
        self._outputs.setdefault(key, {})[(topic, form)] = exc

    def refused_before(self, records: Sequence[Any], message: Any) -> BaseException | None:
        """The exception `message` (an Outgoing of `records`) was refused with in an aborted
        transaction, or None."""
        if not self._outputs:  # nothing remembered: no loop over a frame's sources per send
            return None
        wanted = (message.topic, message.form)
        for j in message.sources:
            record = records[j]
            refused = self._outputs.get((record.topic, record.partition, record.offset))
            if refused is not None and wanted in refused:
                return refused[wanted]
        return None

    def learn(self, message: Any, refused: Refusal) -> None:
        """What the broker's refusal of `message` (an Outgoing) says about later outputs: a
        topic that refuses whatever it is sent is not tried for TOPIC_REFUSAL_S, and a frame
        too large makes later frames smaller (`learn_frame`), those of both framed topics."""
        if refused.topic_wide:
            self.refuse_topic(message.topic, refused.exc)
        if refused.too_large and len(message.sources) > 1:  # a frame
            longest = max(len(line) for line in (message.value or b"").split(b"\n"))
            self.learn_frame(message.size, longest + 1)

    def learn_frame(self, size: int, smallest: int) -> None:
        """A frame of `size` bytes was refused as too large: later frames are cut at an
        eighth of it (at least `smallest`, one line). The broker does not say its limit, and
        under exactly_once each guess too large costs an aborted transaction: an eighth gets
        from the default 256 KiB frame under a 64 KiB limit in one step, or from 26 KB under
        4 KB, for frames that are still hundreds of lines long under the default 1 MB."""
        self.frame_bytes = max(smallest, min(self.frame_bytes, size // 8))

    def committed(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Forget the refusals of records now committed."""
        if not self._outputs:
            return
        for key in list(self._outputs):
            end = offsets.get(TopicPartition(key[0], key[1]))
            if end is not None and key[2] < end:
                del self._outputs[key]

    def forget(self, partitions: set[TopicPartition]) -> None:
        """The partitions went to another worker, which finds their refusals itself."""
        for key in [k for k in self._outputs if TopicPartition(k[0], k[1]) in partitions]:
            del self._outputs[key]
