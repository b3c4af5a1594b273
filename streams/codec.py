"""Record values to one uint8 image array per batch, with a validity mask and a reason for every
record that cannot be used.

raw:  the value is exactly 784 bytes, uint8, row-major 28x28.
json: an object with `pixels` (784 numbers, integers 0..255, flat or as 28 rows of 28) or `b64`
      (base64 of the 784 bytes, standard or URL-safe alphabet),
      and optionally `id` (a string or finite number that is copied into alerts, at most
      MAX_ID_BYTES as JSON text). Duplicate keys, booleans as pixels and nesting deeper than
      Python's recursion limit are rejected, each record on its own.
image: the value is an image file (PNG, JPEG, BMP, TIFF, WebP, GIF) of any size, made into the
      model's input by the bundle's preprocessing (detector.preprocess, the one function that
      does it for training, `vaewatch score` and the HTTP API too), the batch's files decoded in
      threads; what it refuses is dead-lettered with its reason (detector.preprocess's
      IMAGE_REASONS: too_large, corrupt_image, animated, ...).

With `keys`, a record whose Kafka key is longer than MAX_KEY_BYTES is rejected too: ids and keys
are copied into every alert, and must not push it past the producer's request size.

The raw path is whole-array work: lengths via map(len), one join, one frombuffer. JSON has to be
parsed record by record; the pixel checks after parsing are done on the whole batch at once.
Every record ends valid or with a (reason, detail): nothing in a record can make the batch raise.

`decode_image_values` is the same parser for image values already out of their JSON (the HTTP
API's `{"images": [...]}`), so an image is read alike, with the same reasons, however it comes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

import numpy as np
from PIL import Image

from detector.config import IMAGE_PIXELS, IMAGE_SIDE
from detector.preprocess import DECODE_ERROR, IMAGE_REASONS, ImageDecoding, preprocess_images

# Dead-letter reasons: a bounded set, used as a metric label and in the DLQ headers.
NULL_VALUE = "null_value"
WRONG_LENGTH = "wrong_length"
BAD_JSON = "bad_json"
BAD_SCHEMA = "bad_schema"
BAD_BASE64 = "bad_base64"
NOT_FINITE = "not_finite"
OUT_OF_RANGE = "out_of_range"
NOT_INTEGER = "not_integer"
BAD_ID = "bad_id"
BAD_KEY = "bad_key"
# DECODE_ERROR (detector.preprocess): the decoder itself failed on the batch or a record (a bug)
SCORING_ERROR = "scoring_error"  # the detector raised on the batch
UNREADABLE = "unreadable"  # kafka-python could not parse the record itself
REASONS = (
    NULL_VALUE,
    WRONG_LENGTH,
    BAD_JSON,
    BAD_SCHEMA,
    BAD_BASE64,
    NOT_FINITE,
    OUT_OF_RANGE,
    NOT_INTEGER,
    BAD_ID,
    BAD_KEY,
    *IMAGE_REASONS,
)
DEAD_LETTER_REASONS = (*REASONS, DECODE_ERROR, SCORING_ERROR, UNREADABLE)

# Bounds on what a record copies into its alert: a UUID-like id is ~40 bytes, a Kafka key rarely
# more than a few hundred. Far below the producer's 1 MiB request size, whatever the headers.
MAX_ID_BYTES = 1024
MAX_KEY_BYTES = 4096
_DETAIL_CHARS = 200
_NUMBER_TYPES = frozenset((int, float))
_NUMBER_ARRAY_BYTES = b"0123456789-+.eE,[] \t\r\n"


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


class _DuplicateKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook: `{"pixels": A, "pixels": B}` is ambiguous; json would keep B."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        counts = Counter(key for key, _ in pairs)
        raise _DuplicateKeyError(next(key for key, n in counts.items() if n > 1))
    return obj


def check_id(record_id: Any) -> str | None:
    """None when the id can be copied into an alert as JSON, else why not. The common ids
    (short ASCII strings, small numbers) are decided without writing them out."""
    kind = type(record_id)
    if kind is str:
        if record_id.isascii():
            # JSON escapes an ASCII character in at most 6 bytes (\u001f), quotes add 2.
            if len(record_id) * 6 + 2 <= MAX_ID_BYTES:
                return None
        else:
            try:
                record_id.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (\ud800): not text parsers accept
                return "id is not valid Unicode (lone surrogate)"
    elif kind is int:
        # An int's length as text follows from its bit length (about 0.3 digits a bit).
        bits = record_id.bit_length()
        if bits <= 3 * MAX_ID_BYTES:
            return None
        if bits > 4 * MAX_ID_BYTES:
            return f"id is over {MAX_ID_BYTES} bytes as JSON"
    elif kind is float:
        return None if math.isfinite(record_id) else f"id must be finite, got {record_id!r}"
    elif record_id is None:
        return None
    else:  # bool, list, dict (json gives no other types)
        return f"id must be a string or a number, got {kind.__name__}"
    if len(json.dumps(record_id)) > MAX_ID_BYTES:
        return f"id is over {MAX_ID_BYTES} bytes as JSON"
    return None


def _may_hold_strings_or_bools(value: bytes) -> bool:
    """False only when every array in the record holds numbers alone: the text from the first
    [ to the last ] (which spans the pixels array) has nothing but the characters of JSON
    numbers. One C pass over the bytes, so the exact check of 784 element types runs only for
    the odd record."""
    if not isinstance(value, bytes | bytearray):
        return True
    arrays = value[value.find(b"[") : value.rfind(b"]")]
    return bool(arrays.translate(None, _NUMBER_ARRAY_BYTES))


def decode_base64(text: str) -> tuple[bytes | None, str | None, str]:
    """One image as base64 of its 784 bytes (standard or URL-safe alphabet, surrounding white
    space ignored) -> (the bytes, None, "") or (None, reason, detail)."""
    cleaned = text.strip()
    altchars = b"-_" if ("-" in cleaned or "_" in cleaned) else None
    try:
        raw = base64.b64decode(cleaned, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: characters outside ASCII
        return None, BAD_BASE64, f"not valid base64 ({exc})"[:_DETAIL_CHARS]
    if len(raw) != IMAGE_PIXELS:
        return None, WRONG_LENGTH, f"base64 of {len(raw)} bytes, expected {IMAGE_PIXELS}"
    return raw, None, ""


def _pixel_list(pixels: list, source: bytes | None) -> tuple[Any, str | None, str]:
    """784 numbers, or 28 rows of 28, -> (the flat list, None, "") or (None, reason, detail);
    the values themselves are checked batch-wide by _pixel_lists_to_rows."""
    if len(pixels) == IMAGE_SIDE and all(type(row) is list for row in pixels):
        pixels = [pixel for row in pixels for pixel in row]
        source = None  # the flattened list is no longer the text the quick check reads
    if len(pixels) != IMAGE_PIXELS:
        return None, WRONG_LENGTH, f"{len(pixels)} pixels, expected {IMAGE_PIXELS}"
    # numpy would take true/false as 1/0, and make one string of a million characters into a
    # batch array of that width: only ints and floats go on.
    if source is None or _may_hold_strings_or_bools(source):
        kinds = set(map(type, pixels))
        if not kinds <= _NUMBER_TYPES:
            if bool in kinds:
                return None, BAD_SCHEMA, "pixels must be numbers, not true/false"
            return None, BAD_SCHEMA, "pixels must be numbers"
    return pixels, None, ""


def _image_value(value: Any, source: bytes | None = None) -> tuple[Any, str | None, str]:
    """A list of pixels or a base64 string -> (pixel list or 784 bytes, None, "") or (None,
    reason, detail). `source`, the record's text, lets the pixel check skip the common case."""
    if isinstance(value, str):
        return decode_base64(value)
    if isinstance(value, list):
        return _pixel_list(value, source)
    return (
        None,
        BAD_SCHEMA,
        f"an image is a list of {IMAGE_PIXELS} numbers or a base64 string, "
        f"not {type(value).__name__}",
    )


def _parse_json(value: bytes | None) -> tuple[Any, Any, str | None, str]:
    """-> (pixels list or 784 bytes, id, reason, detail) for one JSON record."""
    if value is None:
        return None, None, NULL_VALUE, "record has no value"
    try:
        obj = json.loads(value, object_pairs_hook=_unique_keys)
    except _DuplicateKeyError as exc:
        # repr() escapes control characters and surrogates (up to 10 characters each): cut after.
        return None, None, BAD_SCHEMA, f"duplicate key {str(exc)[:_DETAIL_CHARS]!r}"[:_DETAIL_CHARS]
    except RecursionError:
        return None, None, BAD_JSON, "nested too deeply"
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        return None, None, BAD_JSON, str(exc)[:_DETAIL_CHARS]
    if not isinstance(obj, dict):
        return None, None, BAD_SCHEMA, f"expected a JSON object, got {type(obj).__name__}"
    record_id = obj.get("id")
    id_problem = check_id(record_id)
    if id_problem is not None:
        return None, None, BAD_ID, id_problem
    pixels = obj.get("pixels")
    if isinstance(pixels, list):
        image, reason, detail = _pixel_list(pixels, value)
        return image, record_id, reason, detail
    encoded = obj.get("b64")
    if isinstance(encoded, str):
        image, reason, detail = decode_base64(encoded)
        return image, record_id, reason, detail
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
        if row.dtype == object and all(type(v) in _NUMBER_TYPES for v in pixels):
            # numpy keeps an int beyond int64 (with or without floats beside it) as an object
            out.append((None, (OUT_OF_RANGE, "pixels must lie in 0..255")))
            continue
        check = _check_pixel_rows(row.reshape(1, -1))[0]
        out.append((row if check is None else None, check))
    return out


def _assemble(
    n: int, images: dict[int, Any], errors: dict[int, tuple[str, str]], ids: dict[int, Any]
) -> DecodedBatch:
    """One batch of n values from the parsed ones: `images` maps an index to its pixel list or
    784 bytes, `errors` the others to (reason, detail). The pixel lists are checked here, all at
    once."""
    valid = np.zeros(n, dtype=bool)
    out = np.empty((n, IMAGE_PIXELS), dtype=np.uint8)
    list_rows: list[int] = []
    lists: list[list[Any]] = []
    for i, image in images.items():
        if isinstance(image, bytes):
            out[i] = np.frombuffer(image, dtype=np.uint8)
            valid[i] = True
        else:
            list_rows.append(i)
            lists.append(image)
    if lists:
        for i, (row, check) in zip(list_rows, _pixel_lists_to_rows(lists), strict=True):
            if check is not None:
                errors[i] = check
            else:
                out[i] = row
                valid[i] = True
    kept = np.flatnonzero(valid).tolist()
    return DecodedBatch(
        images=out[valid] if len(kept) < n else out,
        valid=valid,
        errors=errors,
        ids=[ids.get(i) for i in kept],
    )


def decode_json(values: Sequence[bytes | None]) -> DecodedBatch:
    errors: dict[int, tuple[str, str]] = {}
    images: dict[int, Any] = {}
    ids: dict[int, Any] = {}
    for i, value in enumerate(values):
        try:
            pixels, record_id, reason, detail = _parse_json(value)
        except Exception as exc:  # a decoder bug: dead-letter this record, not the batch
            pixels, record_id = None, None
            reason, detail = DECODE_ERROR, f"{type(exc).__name__}: {exc}"[:_DETAIL_CHARS]
        if reason is not None:
            errors[i] = (reason, detail)
            continue
        ids[i] = record_id
        images[i] = pixels
    return _assemble(len(values), images, errors, ids)


def decode_image_values(values: Sequence[Any]) -> DecodedBatch:
    """Images already parsed out of JSON, each a list of 784 numbers (or 28 rows of 28) or a
    base64 string of the 784 bytes: the checks and reasons of the json codec's `pixels` and
    `b64`. Invalid values are reported, never raised."""
    errors: dict[int, tuple[str, str]] = {}
    images: dict[int, Any] = {}
    for i, value in enumerate(values):
        image, reason, detail = _image_value(value)
        if reason is not None:
            errors[i] = (reason, detail)
        else:
            images[i] = image
    return _assemble(len(values), images, errors, {})


def _reject_long_keys(decoded: DecodedBatch, keys: Sequence[bytes | None]) -> DecodedBatch:
    """Move records whose key is over MAX_KEY_BYTES from the valid ones to the errors."""
    with contextlib.suppress(TypeError, ValueError):  # a None key: the exact pass below
        if max(map(len, keys)) <= MAX_KEY_BYTES:
            return decoded
    too_long = np.fromiter(
        (key is not None and len(key) > MAX_KEY_BYTES for key in keys), dtype=bool, count=len(keys)
    )
    if not too_long.any():
        return decoded
    rejected = too_long & decoded.valid
    kept = ~rejected[decoded.valid]  # over the valid records, in order
    errors = dict(decoded.errors)
    for i in np.flatnonzero(rejected).tolist():
        errors[i] = (BAD_KEY, f"record key is {len(keys[i])} bytes, at most {MAX_KEY_BYTES}")
    return DecodedBatch(
        images=decoded.images[kept],
        valid=decoded.valid & ~rejected,
        errors=errors,
        ids=None if decoded.ids is None else list(compress(decoded.ids, kept)),
    )


def decode_image_files(values: Sequence[bytes | None], decoding: ImageDecoding) -> DecodedBatch:
    """Image files, all of the batch's at once (detector.preprocess.preprocess_images)."""
    present = [i for i, value in enumerate(values) if value is not None]
    files = values if len(present) == len(values) else [values[i] for i in present]
    done = preprocess_images(files, decoding)  # type: ignore[arg-type]
    if len(present) == len(values):
        return DecodedBatch(images=done.images, valid=done.valid, errors=done.errors)
    valid = np.zeros(len(values), dtype=bool)
    valid[present] = done.valid
    errors = {present[i]: error for i, error in done.errors.items()}
    for i in np.flatnonzero(valid == 0).tolist():
        errors.setdefault(i, (NULL_VALUE, "record has no value"))
    return DecodedBatch(images=done.images, valid=valid, errors=errors)


def decode_batch(
    values: Sequence[bytes | None],
    *,
    codec: str,
    keys: Sequence[bytes | None] | None = None,
    images: ImageDecoding | None = None,
) -> DecodedBatch:
    """Decode a batch of record values (and check their keys, when given); invalid records are
    reported, never raised. The image codec needs `images`: the bundle's preprocessing and the
    process's limits and threads."""
    if not values:
        return DecodedBatch(images=_empty_images(), valid=np.zeros(0, dtype=bool))
    if codec == "raw":
        decoded = decode_raw(values)
    elif codec == "json":
        decoded = decode_json(values)
    elif codec == "image":
        if images is None:
            raise ValueError("the image codec needs the bundle's preprocessing (images=)")
        decoded = decode_image_files(values, images)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    if keys is not None:
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys for {len(values)} values")
        decoded = _reject_long_keys(decoded, keys)
    return decoded


def encode_images(images: np.ndarray, *, codec: str, ids: Sequence[Any] | None = None) -> list:
    """The inverse, for `vaewatch produce` and the tests: one record value per image (a 28 x 28
    grey PNG for the image codec)."""
    images = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), IMAGE_PIXELS)
    if codec == "image":
        return [png_file(row) for row in images]
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


def png_file(image: np.ndarray) -> bytes:
    """One 28 x 28 grey image (784 uint8) as the bytes of a PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8).reshape(IMAGE_SIDE, IMAGE_SIDE)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()
