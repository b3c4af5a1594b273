"""Image files for the tests of every path that reads them (detector.preprocess, the image
codec, `vaewatch score`, the HTTP API): well-formed ones in each format and mode, and one file of
each hostile kind with the reason it must be refused with."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

# A 28 x 28 image with every grey level somewhere, and the same shape on a 64 x 48 canvas.
PIXELS = (np.arange(784, dtype=np.uint32).reshape(28, 28) * 7 % 256).astype(np.uint8)
NOISE = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)


def encode(picture: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_size(width: int, height: int) -> bytes:
    """A grey PNG whose header says width x height, with one compressed scanline of zeros: tiny,
    and a decompression bomb if anything decoded it whole."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * (width + 1))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", data)
        + png_chunk(b"IEND", b"")
    )


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (30, 30), (v, v, v)) for v in (0, 200)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:])


def exif_rotated_jpeg(upright: np.ndarray, orientation: int = 6) -> bytes:
    """A JPEG whose pixels are stored turned, with the EXIF tag that turns them back upright (as
    a phone stores a portrait photo): orientation 6 = the viewer turns it 90 degrees clockwise."""
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def hostile_files() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the reason it is refused with) under the default limits."""
    png = encode(Image.fromarray(NOISE))
    jpeg = encode(Image.fromarray(NOISE).resize((64, 64)), "JPEG", quality=90)
    return {
        "empty": (b"", "not_an_image"),
        "text": (b"these are words, not pixels", "not_an_image"),
        "eps (a format that is not opened)": (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not_an_image"),
        "truncated png": (png[: len(png) // 2], "corrupt_image"),
        "truncated jpeg": (jpeg[: len(jpeg) // 2], "corrupt_image"),
        "png with a broken crc": (png[:40] + bytes([png[40] ^ 0xFF]) + png[41:], "corrupt_image"),
        "bomb over the pixel limit (60 megapixels)": (png_of_size(10_000, 6_000), "too_large"),
        "bomb over pillow's limit (400 megapixels)": (png_of_size(20_000, 20_000), "too_large"),
        "animated gif": (animated("GIF"), "animated"),
        "animated png": (animated("PNG"), "animated"),
        "animated webp": (animated("WEBP"), "animated"),
        "multi-page tiff": (animated("TIFF"), "animated"),
        "32-bit float tiff": (
            encode(Image.fromarray(NOISE.astype(np.float32) / 255), "TIFF"), "bad_depth"
        ),
    }  # fmt: skip
