"""Record values to one uint8 image array per batch, with a validity mask and a reason for every
record that cannot be used.

raw:  the value is exactly 784 bytes, uint8, row-major 28x28.
json: an object with `pixels` (784 numbers, integers 0..255) or `b64` (base64 of the 784 bytes),
      and optionally `id` (a string or number that is copied into alerts).

The raw path is whole-array work: lengths via map(len), one join, one frombuffer. JSON has to be
parsed record by record; the pixel checks after parsing are done on the whole batch at once.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

import numpy as np

from detector.config import IMAGE_PIXELS

# Dead-letter reasons: a bounded set, used as a metric label and in the DLQ headers.
NULL_VALUE = "null_value"
WRONG_LENGTH = "wrong_length"
BAD_JSON = "bad_json"
BAD_SCHEMA = "bad_schema"
BAD_BASE64 = "bad_base64"
NOT_FINITE = "not_finite"
OUT_OF_RANGE = "out_of_range"
NOT_INTEGER = "not_integer"
DECODE_ERROR = "decode_error"  # the decoder itself failed on the batch (a bug)
SCORING_ERROR = "scoring_error"  # the detector raised on the batch
REASONS = (
    NULL_VALUE,
    WRONG_LENGTH,
    BAD_JSON,
    BAD_SCHEMA,
    BAD_BASE64,
    NOT_FINITE,
    OUT_OF_RANGE,
    NOT_INTEGER,
)
DEAD_LETTER_REASONS = (*REASONS, DECODE_ERROR, SCORING_ERROR)


@dataclass
class DecodedBatch:
    """`images` holds the valid records only, in order; `valid[i]` says whether record i is one
    of them. `errors` maps the index of every invalid record to (reason, detail)."""

    images: np.ndarray
    valid: np.ndarray
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)
    ids: list[Any] | None = None  # per valid image, from the JSON `id` field

    @property
    def n_valid(self) -> int:
        return len(self.images)


def _empty_images() -> np.ndarray:
    return np.empty((0, IMAGE_PIXELS), dtype=np.uint8)


def decode_raw(values: Sequence[bytes | None]) -> DecodedBatch:
    n = len(values)
    try:
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=n)
    except TypeError:  # a tombstone (None value) somewhere in the batch: the rare path
        lengths = np.fromiter((-1 if v is None else len(v) for v in values), np.int64, count=n)
    valid = lengths == IMAGE_PIXELS
    if valid.all():
        buffer = bytearray().join(values)  # type: ignore[arg-type]
        images = np.frombuffer(buffer, dtype=np.uint8).reshape(n, IMAGE_PIXELS)
        return DecodedBatch(images=images, valid=valid)
    errors: dict[int, tuple[str, str]] = {}
    for i in np.flatnonzero(~valid).tolist():
        if lengths[i] < 0:
            errors[i] = (NULL_VALUE, "record has no value")
        else:
            errors[i] = (WRONG_LENGTH, f"{lengths[i]} bytes, expected {IMAGE_PIXELS}")
    buffer = bytearray().join(compress(values, valid))  # type: ignore[arg-type]
    images = np.frombuffer(buffer, dtype=np.uint8).reshape(-1, IMAGE_PIXELS)
    return DecodedBatch(images=images, valid=valid, errors=errors)


def _parse_json(value: bytes | None) -> tuple[Any, Any, str | None, str]:
    """-> (pixels list or 784 bytes, id, reason, detail) for one JSON record."""
    if value is None:
        return None, None, NULL_VALUE, "record has no value"
    try:
        obj = json.loads(value)
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        return None, None, BAD_JSON, str(exc)[:200]
    if not isinstance(obj, dict):
        return None, None, BAD_SCHEMA, f"expected a JSON object, got {type(obj).__name__}"
    record_id = obj.get("id")
    pixels = obj.get("pixels")
    if isinstance(pixels, list):
        if len(pixels) != IMAGE_PIXELS:
            return None, None, WRONG_LENGTH, f"{len(pixels)} pixels, expected {IMAGE_PIXELS}"
        return pixels, record_id, None, ""
    encoded = obj.get("b64")
    if isinstance(encoded, str):
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            return None, None, BAD_BASE64, str(exc)[:200]
        if len(raw) != IMAGE_PIXELS:
            return None, None, WRONG_LENGTH, f"{len(raw)} bytes in b64, expected {IMAGE_PIXELS}"
        return raw, record_id, None, ""
    return None, None, BAD_SCHEMA, "needs 'pixels' (list of 784 numbers) or 'b64' (string)"


def _check_pixel_rows(rows: np.ndarray) -> list[tuple[str, str] | None]:
    """Per row: None when the 784 numbers are finite integers in 0..255, else (reason, detail)."""
    result: list[tuple[str, str] | None] = [None] * len(rows)
    if rows.dtype.kind not in "iufb":
        return [(BAD_SCHEMA, "pixels must be numbers")] * len(rows)
    if rows.dtype.kind == "f":
        bad_finite = ~np.isfinite(rows).all(axis=1)
        bad_integer = ~bad_finite & (rows != np.floor(np.where(np.isfinite(rows), rows, 0))).any(
            axis=1
        )
    else:
        bad_finite = np.zeros(len(rows), dtype=bool)
        bad_integer = bad_finite
    with np.errstate(invalid="ignore"):
        bad_range = ~bad_finite & ((rows < 0) | (rows > 255)).any(axis=1)
    for i in np.flatnonzero(bad_finite).tolist():
        result[i] = (NOT_FINITE, "pixels contain NaN or infinity")
    for i in np.flatnonzero(bad_range).tolist():
        result[i] = (OUT_OF_RANGE, "pixels must lie in 0..255")
    for i in np.flatnonzero(bad_integer & ~bad_range).tolist():
        result[i] = (NOT_INTEGER, "pixels must be integers")
    return result


def _pixel_lists_to_rows(lists: list[list[Any]]) -> list[tuple[np.ndarray | None, tuple | None]]:
    """Convert all pixel lists at once; fall back to one by one when the batch is mixed."""
    try:
        rows = np.array(lists)
        if rows.ndim == 2 and rows.dtype.kind in "iufb":
            checks = _check_pixel_rows(rows)
            return [(rows[i] if c is None else None, c) for i, c in enumerate(checks)]
    except (ValueError, TypeError):
        pass
    out: list[tuple[np.ndarray | None, tuple | None]] = []
    for pixels in lists:
        try:
            row = np.array(pixels)
        except (ValueError, TypeError):
            out.append((None, (BAD_SCHEMA, "pixels must be numbers")))
            continue
        if row.ndim != 1:
            out.append((None, (BAD_SCHEMA, "pixels must be a flat list of numbers")))
            continue
        check = _check_pixel_rows(row.reshape(1, -1))[0]
        out.append((row if check is None else None, check))
    return out


def decode_json(values: Sequence[bytes | None]) -> DecodedBatch:
    n = len(values)
    valid = np.zeros(n, dtype=bool)
    errors: dict[int, tuple[str, str]] = {}
    list_rows: list[int] = []
    lists: list[list[Any]] = []
    byte_rows: dict[int, bytes] = {}
    ids: dict[int, Any] = {}
    for i, value in enumerate(values):
        pixels, record_id, reason, detail = _parse_json(value)
        if reason is not None:
            errors[i] = (reason, detail)
            continue
        ids[i] = record_id
        if isinstance(pixels, bytes):
            byte_rows[i] = pixels
        else:
            list_rows.append(i)
            lists.append(pixels)
    images = np.empty((n, IMAGE_PIXELS), dtype=np.uint8)
    for i, raw in byte_rows.items():
        images[i] = np.frombuffer(raw, dtype=np.uint8)
        valid[i] = True
    if lists:
        for i, (row, check) in zip(list_rows, _pixel_lists_to_rows(lists), strict=True):
            if check is not None:
                errors[i] = check
            else:
                images[i] = row
                valid[i] = True
    kept = np.flatnonzero(valid).tolist()
    return DecodedBatch(
        images=images[valid] if len(kept) < n else images,
        valid=valid,
        errors=errors,
        ids=[ids[i] for i in kept],
    )


def decode_batch(values: Sequence[bytes | None], *, codec: str) -> DecodedBatch:
    """Decode a batch of record values; invalid records are reported, never raised."""
    if not values:
        return DecodedBatch(images=_empty_images(), valid=np.zeros(0, dtype=bool))
    if codec == "raw":
        return decode_raw(values)
    if codec == "json":
        return decode_json(values)
    raise ValueError(f"unknown codec {codec!r}")


def encode_images(images: np.ndarray, *, codec: str, ids: Sequence[Any] | None = None) -> list:
    """The inverse, for `vaewatch produce` and the tests: one record value per image."""
    images = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), IMAGE_PIXELS)
    if codec == "raw":
        data = images.tobytes()
        return [data[i : i + IMAGE_PIXELS] for i in range(0, len(data), IMAGE_PIXELS)]
    if codec == "json":
        out = []
        for i, row in enumerate(images):
            obj: dict[str, Any] = {"b64": base64.b64encode(row.tobytes()).decode("ascii")}
            if ids is not None:
                obj["id"] = ids[i]
            out.append(json.dumps(obj, separators=(",", ":")).encode())
        return out
    raise ValueError(f"unknown codec {codec!r}")
