"""Images in and out of HTTP: PNG files, JSON pixel lists and base64 of the 784 bytes in;
PNGs (single images, heatmaps, grids) out. Every bad input raises InputError naming it."""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from detector.config import IMAGE_PIXELS, IMAGE_SIDE
from detector.png import PngError, png_pixels
from serve.errors import InputError

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


def decode_png(data: bytes, *, name: str) -> np.ndarray:
    """A 28x28 PNG (any 8- or 16-bit mode, decoded as `vaewatch score` does) -> 784 uint8."""
    try:
        return png_pixels(data)
    except PngError as exc:
        raise _bad(exc.code, f"{name}: {exc}") from None


def decode_base64(text: str, *, name: str) -> np.ndarray:
    """Base64 (standard or URL-safe) of exactly 784 bytes -> 784 uint8."""
    try:
        cleaned = text.strip()
        altchars = b"-_" if ("-" in cleaned or "_" in cleaned) else None
        raw = base64.b64decode(cleaned, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("bad_base64", f"{name}: not valid base64") from None
    if len(raw) != IMAGE_PIXELS:
        raise _bad(
            "wrong_size", f"{name}: base64 decodes to {len(raw)} bytes, expected {IMAGE_PIXELS}"
        )
    return np.frombuffer(raw, dtype=np.uint8).copy()


def decode_pixels(value: Any, *, name: str) -> np.ndarray:
    """784 ints 0..255, or 28 rows of 28 -> 784 uint8."""
    if not isinstance(value, list):
        raise _bad(
            "bad_type",
            f"{name}: expected a list of 784 integers or a base64 string, "
            f"got {type(value).__name__}",
        )
    if len(value) == IMAGE_SIDE and all(isinstance(row, list) for row in value):
        value = [pixel for row in value for pixel in row]
    if len(value) != IMAGE_PIXELS:
        raise _bad("wrong_size", f"{name}: {len(value)} pixels, expected {IMAGE_PIXELS} (28x28)")
    if not all(type(p) is int for p in value):
        wrong = next(p for p in value if type(p) is not int)
        raise _bad("bad_type", f"{name}: pixels must be integers 0..255, found {wrong!r}")
    pixels = np.asarray(value, dtype=np.int64)
    if pixels.min() < 0 or pixels.max() > 255:
        raise _bad("out_of_range", f"{name}: pixels must be 0..255, found {int(pixels.max())}")
    return pixels.astype(np.uint8)


def decode_json_images(body: Any, *, limit: int) -> np.ndarray:
    """{"images": [item, ...]} where an item is 784 ints or base64 of 784 bytes -> N x 784."""
    if not isinstance(body, dict) or "images" not in body:
        raise _bad("bad_json", 'expected a JSON object {"images": [...]}')
    items = body["images"]
    if not isinstance(items, list):
        raise _bad("bad_type", f'"images" must be a list, got {type(items).__name__}')
    check_count(len(items), limit)
    rows = [
        decode_base64(item, name=f"images[{i}]")
        if isinstance(item, str)
        else decode_pixels(item, name=f"images[{i}]")
        for i, item in enumerate(items)
    ]
    return np.stack(rows)


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


def grid_image(images: np.ndarray, *, columns: int | None = None, gap: int = 2) -> np.ndarray:
    """uint8 images (N x 784) tiled into one grey picture, `gap` black pixels between them."""
    images = np.asarray(images, dtype=np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    n = len(images)
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    step = IMAGE_SIDE + gap
    grid = np.zeros((rows * step - gap, columns * step - gap), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * step : r * step + IMAGE_SIDE, c * step : c * step + IMAGE_SIDE] = image
    return grid


def b64_png(pixels: np.ndarray) -> str:
    return base64.b64encode(png_bytes(pixels)).decode("ascii")
