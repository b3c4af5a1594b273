"""The one PNG decoder (detector/png.py): 8- and 16-bit grey and colour PNGs to 784 uint8, every
other file a PngError with its code and one line."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from detector.png import PngError, png_pixels


def _encode(picture: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt)
    return buffer.getvalue()


PIXELS = np.arange(784, dtype=np.uint32).reshape(28, 28) % 256
NOISE = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)


def test_8_bit_16_bit_and_rgb_pngs_give_the_same_grey_values() -> None:
    grey = Image.fromarray(PIXELS.astype(np.uint8))
    wide = Image.fromarray((PIXELS * 257).astype(np.uint16))
    assert wide.mode.startswith("I;16")
    want = PIXELS.astype(np.uint8).ravel()
    for picture in (grey, wide, grey.convert("RGB"), grey.convert("LA")):
        np.testing.assert_array_equal(png_pixels(_encode(picture)), want)


def test_16_bit_samples_round_as_png_defines() -> None:
    # v8 = round(v16 * 255 / 65535): 129 -> 1, 32896 -> 128, 65535 -> 255, 128 -> 0
    wide = np.full((28, 28), 128, np.uint16)
    wide[0, :3] = (129, 32896, 65535)
    pixels = png_pixels(_encode(Image.fromarray(wide)))
    assert pixels[:4].tolist() == [1, 128, 255, 0]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"these are words", "not_an_image"),
        (_encode(Image.new("L", (28, 28)), "JPEG"), "not_png"),
        (_encode(Image.new("L", (32, 28))), "wrong_size"),
        (_encode(Image.fromarray(NOISE))[:300], "not_an_image"),  # truncated
    ],
)
def test_what_is_not_a_28x28_png_is_one_line_with_its_code(data: bytes, code: str) -> None:
    with pytest.raises(PngError) as caught:
        png_pixels(data)
    assert caught.value.code == code and "\n" not in str(caught.value)
