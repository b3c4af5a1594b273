"""The one PNG decoder of vaewatch's input images: a 28x28 PNG of any 8- or 16-bit mode to the
784 uint8 grey values the model scores. `vaewatch score` (a folder of PNGs) and the HTTP API
(uploaded PNGs) both use it, so one file gets one score whichever way it comes in."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from detector.config import IMAGE_PIXELS, IMAGE_SIDE

# Pillow's modes of 16-bit grayscale PNGs. PNG's own rule for a smaller sample depth is
# v8 = round(v16 * 255 / 65535); Pillow's convert("L") clips at 255 instead, which turns
# almost every pixel white.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class PngError(ValueError):
    """A PNG that cannot be an input image. `code` names the problem for the HTTP API (not_png,
    wrong_size, bad_depth, not_an_image); the message is one line, without the file's name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def png_pixels(source: bytes | Path) -> np.ndarray:
    """784 uint8 grey values of a 28x28 PNG (bytes or a file); raises PngError."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as picture:
            if picture.format != "PNG":
                raise PngError("not_png", f"a {picture.format} image, not a PNG")
            if picture.size != (IMAGE_SIDE, IMAGE_SIDE):
                width, height = picture.size
                raise PngError("wrong_size", f"image is {width}x{height}, not 28x28")
            return _grey(picture)
    except Image.DecompressionBombError:  # refused before decoding anything
        raise PngError("wrong_size", "image is not 28x28 (far too many pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise PngError("not_an_image", f"not a readable PNG image ({_first_line(exc)})") from None


def _grey(picture: Image.Image) -> np.ndarray:
    if picture.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(picture, dtype=np.uint32)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8).reshape(IMAGE_PIXELS)
    if picture.mode in ("I", "F"):  # older Pillows open some 16-bit PNGs as "I"
        raise PngError(
            "bad_depth",
            f"{picture.mode!r} pixels (32-bit) have no agreed 0..255 scale; save it as an 8-bit "
            "or 16-bit grayscale PNG",
        )
    return np.array(picture.convert("L"), dtype=np.uint8).reshape(IMAGE_PIXELS)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
