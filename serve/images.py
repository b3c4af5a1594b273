"""Images in and out of HTTP: image files, JSON pixel lists and base64 of the 784 bytes in (read
by what the rest of vaewatch reads them with: the bundle's preprocessing in detector.preprocess,
the json codec's parser in streams.codec); PNGs (single images, heatmaps, grids) out. Every bad
input raises InputError naming it."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from detector.config import IMAGE_SIDE
from detector.preprocess import TOO_LARGE, ImageDecoding, preprocess_images
from serve.errors import InputError
from streams.codec import BAD_SCHEMA, decode_image_values

# A perceptual ramp from black through red to pale yellow (inferno-like), 256 entries, built
# once from a few anchor colours so the heatmap needs no plotting library.
_ANCHORS = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
     [250, 193, 39], [252, 255, 164]],
    dtype=np.float64,
)  # fmt: skip
_RAMP = np.stack(
    [
        np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
        for c in range(3)
    ],
    axis=1,
).astype(np.uint8)


def _bad(code: str, message: str) -> InputError:
    return InputError(400, code, message)


def check_count(n: int, limit: int) -> None:
    if n == 0:
        raise _bad("no_images", "no images in the request")
    if n > limit:
        raise InputError(
            413, "too_many_images", f"{n} images in one request; at most {limit} are allowed"
        )


def decode_image_files(
    files: list[bytes], *, names: list[str], decoding: ImageDecoding
) -> np.ndarray:
    """Image files of any format and size -> N x 784, made the model's input by the bundle's
    preprocessing, as `vaewatch score` and the worker make them. The first file that cannot be
    one is the error (its reason is the code: not_an_image, corrupt_image, too_large (413),
    animated, bad_depth, bad_mode, wrong_size)."""
    decoded = preprocess_images(files, decoding)
    if decoded.errors:
        index = min(decoded.errors)
        reason, message = decoded.errors[index]
        status = 413 if reason == TOO_LARGE else 400
        raise InputError(status, reason, f"{names[index]}: {message}")
    return decoded.images


def decode_json_images(body: Any, *, limit: int) -> np.ndarray:
    """{"images": [item, ...]} where an item is 784 ints (or 28 rows of 28) or base64 of the 784
    bytes -> N x 784. The items are read by the json codec's parser (streams.codec), so an image
    the worker takes is taken here, and a bad one is named by the same reason."""
    if not isinstance(body, dict) or "images" not in body:
        raise _bad(BAD_SCHEMA, 'expected a JSON object {"images": [...]}')
    items = body["images"]
    if not isinstance(items, list):
        raise _bad(BAD_SCHEMA, f'"images" must be a list, got {type(items).__name__}')
    check_count(len(items), limit)
    decoded = decode_image_values(items)
    if decoded.errors:
        index = min(decoded.errors)
        reason, detail = decoded.errors[index]
        raise _bad(reason, f"images[{index}]: {detail}")
    return decoded.images


def png_bytes(pixels: np.ndarray) -> bytes:
    """A grey (H x W) or RGB (H x W x 3) uint8 array -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def grey_image(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8).reshape(IMAGE_SIDE, IMAGE_SIDE)


def heatmap_image(pixel_nll: np.ndarray) -> np.ndarray:
    """One image's per-pixel map -> 28 x 28 x 3 colours: each pixel's share of the
    reconstruction term from its least (dark) to its largest (bright) in that image."""
    values = np.asarray(pixel_nll, dtype=np.float64).reshape(IMAGE_SIDE, IMAGE_SIDE)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return _RAMP[np.round(scaled * 255).astype(np.int64)]


def b64_png(pixels: np.ndarray) -> str:
    return base64.b64encode(png_bytes(pixels)).decode("ascii")
