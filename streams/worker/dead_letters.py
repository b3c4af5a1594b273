"""What a dead letter carries: the input record's value, key and usable headers, and headers
that say why and where from (docs/wire-contract.md); and the trimmed (or bare) copy, reason
`unsendable`, of a record whose outputs cannot be sent as they are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord

from streams.worker.metrics import UNSENDABLE

# Dead-letter headers (values are UTF-8 text).
H_ERROR = "vaewatch.error"
H_ERROR_DETAIL = "vaewatch.error.detail"
H_SOURCE_TOPIC = "vaewatch.source.topic"
H_SOURCE_PARTITION = "vaewatch.source.partition"
H_SOURCE_OFFSET = "vaewatch.source.offset"
H_SOURCE_TIMESTAMP = "vaewatch.source.timestamp_ms"
H_ORIGINAL_SIZE = "vaewatch.original.size"  # on unsendable copies: the input value's bytes
# An input's own copies of these (a dead letter replayed into the input topic) are dropped from
# its dead letter, which would otherwise carry two reasons.
_DEAD_LETTER_HEADERS = frozenset(
    (
        H_ERROR,
        H_ERROR_DETAIL,
        H_SOURCE_TOPIC,
        H_SOURCE_PARTITION,
        H_SOURCE_OFFSET,
        H_SOURCE_TIMESTAMP,
        H_ORIGINAL_SIZE,
    )
)
NO_TIMESTAMP = -1  # Kafka's; kafka-python gives None for records of message format v0
_COPY_HEADROOM = 16 * 1024  # room left for headers and framing in a trimmed copy
_KEPT_HEADER_BYTES = 4 * 1024  # input headers kept on a trimmed copy, at most
_MAX_KEPT_KEY = 1024  # a longer key is dropped from a trimmed copy


def usable_headers(headers: Sequence[Any] | None) -> list[tuple[str, bytes]] | None:
    """Input headers fit to send again (on alerts and scores too): Kafka allows a null header
    value, which the producer refuses, so such headers (and anything not (str, bytes)) are
    dropped."""
    if not headers:
        return None
    kept = [h for h in headers if isinstance(h[1], bytes) and isinstance(h[0], str)]
    return kept or None


def _input_headers(headers: Sequence[Any] | None) -> list[tuple[str, bytes]]:
    return [h for h in usable_headers(headers) or () if h[0] not in _DEAD_LETTER_HEADERS]


def source_headers(record: ConsumerRecord) -> list[tuple[str, bytes]]:
    timestamp = NO_TIMESTAMP if record.timestamp is None else record.timestamp
    return [
        (H_SOURCE_TOPIC, record.topic.encode()),
        (H_SOURCE_PARTITION, str(record.partition).encode()),
        (H_SOURCE_OFFSET, str(record.offset).encode()),
        (H_SOURCE_TIMESTAMP, str(timestamp).encode()),
    ]


def dead_letter_headers(
    record: ConsumerRecord, reason: str, detail: str
) -> list[tuple[str, bytes]]:
    return [
        *_input_headers(record.headers),
        (H_ERROR, reason.encode()),
        (H_ERROR_DETAIL, detail.encode("utf-8", "backslashreplace")),
        *source_headers(record),
    ]


def _unsendable_detail(exc: BaseException, first_reason: bytes | None) -> bytes:
    """The send's error, after the dead-letter reason the record had first, if any."""
    prefix = f"{first_reason.decode()}, then " if first_reason else ""
    return f"{prefix}{type(exc).__name__}: {exc}"[:200].encode("utf-8", "replace")


def trimmed_copy(
    record: ConsumerRecord,
    exc: BaseException,
    first_reason: bytes | None,
    *,
    max_request_size: int,
    bare: bool = False,
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(value, key, headers) of a dead letter that fits: the input value cut to
    max_request_size, input headers only when usable and small; reason `unsendable`, the error
    and the original size in headers. `bare`: no input value nor headers at all, for a topic
    that refused the trimmed copy as too large (its limit is unknown; the value stays in the
    input topic, at the source coordinates). Always keyed (a compacted topic refuses a null
    key): the input key up to 1 KiB, else topic/partition/offset as on alerts."""
    value = record.value or b""
    kept, size = [], 0
    for name, header_value in () if bare else _input_headers(record.headers):
        header_size = len(name.encode("utf-8", "surrogatepass")) + len(header_value)
        if size + header_size <= _KEPT_HEADER_BYTES:
            kept.append((name, header_value))
            size += header_size
    key = record.key
    if key is None or len(key) > _MAX_KEPT_KEY:
        key = f"{record.topic}/{record.partition}/{record.offset}".encode()
    headers = [
        *kept,
        (H_ERROR, UNSENDABLE.encode()),
        (H_ERROR_DETAIL, _unsendable_detail(exc, first_reason)),
        (H_ORIGINAL_SIZE, str(len(value)).encode()),
        *source_headers(record),
    ]
    budget = 0 if bare else max(0, max_request_size - _COPY_HEADROOM - size)
    return value[:budget], key, headers
