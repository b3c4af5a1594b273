"""How any image file becomes the model's input: 784 uint8 grey values (28 x 28, 0 = background).

`preprocess_image` is the one function that does it, for `vaewatch train` (a folder of files),
`vaewatch score`, the worker's `image` codec and `vaewatch serve`: one file gets one score
whichever way it comes in. Its steps, each a field of `Preprocessing` (recorded in the bundle):

1. open with Pillow, only as PNG, JPEG, BMP, TIFF, WebP or GIF, one frame; refuse what is over
   the byte and pixel limits before decoding it (Pillow's own MAX_IMAGE_PIXELS check stays on);
2. `alpha`: transparent pixels over white or black (or the colour values under them, ignored);
3. `grey`: ITU-R 601-2 luma (Pillow's "L"; a JPEG gives its Y channel directly) or the channel
   mean; `depth`: 16-bit samples scaled as PNG defines (v * 255 / 65535) or each image stretched
   from its own minimum to its maximum;
4. `orientation`: turned as its EXIF orientation tag says (phone photos), or as stored;
5. `invert`: 255 - v, so that the background is 0 as in the training data;
6. `aspect` and `resize`: the whole image scaled into 28 x 28 and padded with background (pad),
   its centre square cropped (crop), or squeezed (stretch), with one of Pillow's filters; or,
   for bundles written before preprocessing was recorded, only 28 x 28 images (exact).

Large JPEGs are decoded at a reduced scale (libjpeg's DCT scaling, `draft`) to at least four
times the output size: much faster, and the same for every path since all of them come here.
"""

from __future__ import annotations

import io
import itertools
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from detector.config import IMAGE_PIXELS, IMAGE_SIDE

# Pillow format names opened; any other format is not even tried (EPS would start Ghostscript).
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
# File names listed as images in a folder (a .txt or .DS_Store beside them is not one).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# Why a file is not an input image: the dead-letter reasons of the image codec, the error codes
# of the HTTP API, the words of `vaewatch train`'s and `score`'s one line per file.
NOT_AN_IMAGE = "not_an_image"  # empty, or not one of FORMATS
CORRUPT_IMAGE = "corrupt_image"  # truncated, or broken data inside
TOO_LARGE = "too_large"  # over max_bytes or max_pixels, or Pillow's decompression-bomb limit
ANIMATED = "animated"  # more than one frame (animated GIF/PNG/WebP, multi-page TIFF)
BAD_DEPTH = "bad_depth"  # 32-bit integer or float samples, which have no agreed 0..255 scale
BAD_MODE = "bad_mode"  # a colour mode without a grey conversion
WRONG_SIZE = "wrong_size"  # not 28 x 28, for a bundle without recorded preprocessing
IMAGE_REASONS = (NOT_AN_IMAGE, CORRUPT_IMAGE, TOO_LARGE, ANIMATED, BAD_DEPTH, BAD_MODE, WRONG_SIZE)
DECODE_ERROR = "decode_error"  # Pillow or this module raised what it should not: a bug

DEFAULT_MAX_PIXELS = 16_777_216  # 4096 x 4096: a 12-megapixel photo; 64 MB as RGBA
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
_DRAFT_OVERSAMPLING = 4  # a JPEG is decoded to at least 4 x 28 pixels across the kept part
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_WIDE_MODES = (*_SIXTEEN_BIT_MODES, "I", "F")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112
# The first bytes of each format's files: a file that starts so and still cannot be opened is a
# broken file of that format, not some other kind of file.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)
_DETAIL_CHARS = 200
# What Pillow's plugins raise on truncated or broken data (struct.error: a short header field).
_BROKEN = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


class _PreprocessingFields(BaseModel):
    """The steps of the preprocessing but the inversion (whose setting may be `auto`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    aspect: Literal["pad", "crop", "stretch", "exact"] = Field(
        "pad",
        description="How an image that is not square becomes 28 x 28: pad (scaled whole into "
        "the square, the rest background), crop (its centre square), stretch (squeezed); exact "
        "accepts 28 x 28 images only (bundles written before preprocessing was recorded).",
    )
    resize: Literal["lanczos", "bicubic", "bilinear", "hamming", "box", "nearest"] = Field(
        "lanczos",
        description="Pillow's resampling filter to 28 x 28 (antialiased when shrinking, except "
        "nearest).",
    )
    grey: Literal["luma", "mean"] = Field(
        "luma",
        description="Colour to grey: luma (ITU-R 601-2, Pillow's L: 0.299 R + 0.587 G + 0.114 B; "
        "a JPEG's Y channel) or mean ((R + G + B) / 3).",
    )
    alpha: Literal["white", "black", "ignore"] = Field(
        "white",
        description="Transparent pixels: composited over white or black, or ignore (the colour "
        "values under the transparency, as Pillow's convert to L does).",
    )
    depth: Literal["scale", "stretch"] = Field(
        "scale",
        description="Samples to 0..255: scale (8-bit as they are, 16-bit v * 255 / 65535 as PNG "
        "defines; 32-bit and float images are refused) or stretch (each image from its own "
        "minimum to its maximum: sensor maps that use part of their range).",
    )
    orientation: Literal["exif", "stored"] = Field(
        "exif",
        description="exif: turn the image as its EXIF orientation tag says (phone photos); "
        "stored: as its pixels are stored.",
    )


class Preprocessing(_PreprocessingFields):
    """How an image file becomes the model's 28 x 28 input; recorded in the bundle."""

    invert: bool = Field(False, description="255 - v after the grey conversion.")


# What bundles written before preprocessing was recorded do with an image file: only 28 x 28,
# grey as Pillow's convert("L") (alpha ignored), 16-bit scaled, no EXIF turn, no inversion.
LEGACY_PREPROCESSING = Preprocessing(
    aspect="exact", alpha="ignore", orientation="stored", invert=False
)


class ImageSettings(_PreprocessingFields):
    """The `images` section: the preprocessing `vaewatch train` records in the bundle (every
    scorer applies the bundle's record, not these keys), and this deployment's limits."""

    invert: bool | Literal["auto"] = Field(
        "auto",
        description="255 - v after the grey conversion, so that the background is 0 as in the "
        "training data: true, false, or auto (decided once by vaewatch train from the border "
        "pixels of up to 256 of the folder's images: inverted when their median is over 127; "
        "images from arrays are never inverted). The bundle records true or false.",
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        ge=1,
        description="Largest image decoded, width x height from the file's header (a JPEG's at "
        "the reduced scale it is decoded at: a 48-megapixel photo decodes at about 0.75); a "
        "larger one is refused before decoding (reason too_large), as is anything over Pillow's "
        "own decompression-bomb limit (Image.MAX_IMAGE_PIXELS x 2). It also bounds the time a "
        "file can take: a 16-megapixel colour PNG took 0.65 s on one core of a loaded 2-core "
        "machine.",
    )
    max_bytes: int = Field(
        DEFAULT_MAX_BYTES, ge=1, description="Largest image file or record value read, bytes."
    )
    decode_threads: int = Field(
        0,
        ge=0,
        description="Threads that decode a batch of image files at once (Pillow releases the "
        "GIL while decoding and resizing); 0 = one per CPU core, at most 8.",
    )

    def decoding(self, preprocessing: Preprocessing) -> ImageDecoding:
        """A bundle's preprocessing with this deployment's limits and threads."""
        threads = self.decode_threads or min(8, os.cpu_count() or 1)
        return ImageDecoding(
            preprocessing, max_pixels=self.max_pixels, max_bytes=self.max_bytes, threads=threads
        )

    def preprocessing(self, *, invert: bool) -> Preprocessing:
        """The record of these settings, with `invert` decided."""
        return Preprocessing(
            **self.model_dump(include=set(Preprocessing.model_fields)) | {"invert": invert}
        )


@dataclass(frozen=True)
class ImageDecoding:
    """A bundle's preprocessing and the limits and threads of the process that applies it."""

    preprocessing: Preprocessing
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    threads: int = 1

    def with_preprocessing(self, preprocessing: Preprocessing) -> ImageDecoding:
        return ImageDecoding(preprocessing, self.max_pixels, self.max_bytes, self.threads)


class ImageError(ValueError):
    """A file that cannot be an input image. `reason` is one of IMAGE_REASONS; the message is one
    line without the file's name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message[:_DETAIL_CHARS])
        self.reason = reason


@dataclass
class PreprocessedImages:
    """`images` holds the valid inputs only, in order; `valid[i]` says whether input i is one of
    them; `errors` maps every other input's index to (reason, message)."""

    images: np.ndarray
    valid: np.ndarray
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)


def preprocess_image(source: bytes | Path, decoding: ImageDecoding) -> np.ndarray:
    """784 uint8 values of one image file (its bytes or its path); raises ImageError."""
    data = _read(source, decoding.max_bytes)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as picture:
            return _model_input(picture, decoding)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's limit, before any decoding
        raise ImageError(TOO_LARGE, _first_line(exc)) from None
    except UnidentifiedImageError:
        known = _format_by_signature(data)
        if known is not None:  # a plugin accepted its signature, then failed on its header
            raise ImageError(CORRUPT_IMAGE, f"a {known} file whose header is broken") from None
        raise ImageError(
            NOT_AN_IMAGE, f"not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} image"
        ) from None
    except MemoryError:
        raise ImageError(TOO_LARGE, "decoding it ran out of memory") from None
    except _BROKEN as exc:
        # Pillow's words for a truncated or broken file: "image file is truncated", "broken
        # PNG file", "cannot identify", "Decompressed data too large for PngImagePlugin..."
        raise ImageError(CORRUPT_IMAGE, f"cannot decode it ({_first_line(exc)})") from None


def preprocess_images(
    sources: Sequence[bytes | Path],
    decoding: ImageDecoding,
    *,
    on_progress: Callable[[int], None] | None = None,
) -> PreprocessedImages:
    """`preprocess_image` over many files at once, in `decoding.threads` threads (Pillow
    releases the GIL while it decodes and resizes), each thread one contiguous share of them.
    Nothing raises: a bad file is an error entry. `on_progress(n)` is called
    from the decoding threads as files are done."""
    n = len(sources)
    out = np.zeros((n, IMAGE_PIXELS), dtype=np.uint8)
    errors: dict[int, tuple[str, str]] = {}

    def run(start: int, stop: int) -> None:
        for i in range(start, stop):
            try:
                out[i] = preprocess_image(sources[i], decoding)
            except ImageError as exc:
                errors[i] = (exc.reason, str(exc))
            except Exception as exc:  # a bug in Pillow or here: this file, not the batch
                errors[i] = (DECODE_ERROR, f"{type(exc).__name__}: {exc}"[:_DETAIL_CHARS])
            if on_progress is not None:
                on_progress(1)

    threads = max(1, min(decoding.threads, n))
    if threads == 1:
        run(0, n)
    else:
        bounds = np.linspace(0, n, threads + 1).astype(int)
        with ThreadPoolExecutor(threads, thread_name_prefix="image-decode") as pool:
            for done in [pool.submit(run, a, b) for a, b in itertools.pairwise(bounds)]:
                done.result()
    valid = np.ones(n, dtype=bool)
    if errors:
        valid[list(errors)] = False
        out = out[valid]
    return PreprocessedImages(images=out, valid=valid, errors=errors)


def _format_by_signature(data: bytes) -> str | None:
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _read(source: bytes | Path, max_bytes: int) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        size = len(source)
        data = bytes(source) if size <= max_bytes else b""
    else:
        try:
            size = Path(source).stat().st_size
            data = Path(source).read_bytes() if size <= max_bytes else b""
        except OSError as exc:
            raise ImageError(NOT_AN_IMAGE, f"cannot read it ({exc.strerror})") from None
    if size > max_bytes:
        raise ImageError(TOO_LARGE, f"{size} bytes, over the limit of {max_bytes}")
    if size == 0:
        raise ImageError(NOT_AN_IMAGE, "empty (0 bytes)")
    return data


def _model_input(picture: Image.Image, decoding: ImageDecoding) -> np.ndarray:
    steps = decoding.preprocessing
    width, height = picture.size
    if picture.format == "JPEG" and steps.aspect != "exact":
        picture.draft("L" if steps.grey == "luma" else "RGB", _draft_size(picture.size, steps))
    decoded = picture.size[0] * picture.size[1]  # a JPEG's at the scale it will be decoded at
    if decoded > decoding.max_pixels:
        raise ImageError(
            TOO_LARGE,
            f"{width}x{height} = {width * height} pixels, over the limit of {decoding.max_pixels}",
        )
    if getattr(picture, "is_animated", False):
        raise ImageError(
            ANIMATED, f"an animated {picture.format} ({picture.n_frames} frames); send one frame"
        )
    if steps.aspect == "exact" and (width, height) != (IMAGE_SIDE, IMAGE_SIDE):
        raise ImageError(
            WRONG_SIZE,
            f"image is {width}x{height}, not 28x28 (this bundle records no preprocessing, so it "
            "takes 28x28 images only; retrain it to score images of other sizes)",
        )
    picture.load()  # truncated or broken data raises here
    grey = _grey(picture, steps)
    if steps.orientation == "exif":
        grey = _upright(grey, picture)
    if steps.invert:
        grey = Image.fromarray(255 - np.asarray(grey))
    return _fit(grey, steps)


def _draft_size(size: tuple[int, int], steps: Preprocessing) -> tuple[int, int]:
    """The smallest size that still covers the kept part of the image with 4 x 28 pixels."""
    width, height = size
    wanted = IMAGE_SIDE * _DRAFT_OVERSAMPLING
    if steps.aspect == "stretch":
        return wanted, wanted
    side = max(width, height) if steps.aspect == "pad" else min(width, height)
    return -(-width * wanted // side), -(-height * wanted // side)


def _grey(picture: Image.Image, steps: Preprocessing) -> Image.Image:
    """One 8-bit grey ("L") image: alpha, grey conversion and bit depth applied."""
    mode = picture.mode
    if mode in _WIDE_MODES:
        return _wide_grey(picture, steps)
    if mode == "LAB":  # its lightness channel is its grey
        picture = picture.getchannel("L")
    elif steps.alpha != "ignore" and (mode in _ALPHA_MODES or picture.has_transparency_data):
        return _stretched(_over_background(picture, steps), steps)
    try:
        if steps.grey == "mean" and mode not in ("L", "1"):
            rgb = np.asarray(picture.convert("RGB"), dtype=np.uint16)
            grey = Image.fromarray(((rgb.sum(axis=2) + 1) // 3).astype(np.uint8))
        else:
            grey = picture if mode == "L" else picture.convert("L")
    except ValueError as exc:  # Pillow has no conversion from this mode
        raise ImageError(BAD_MODE, f"{mode!r} images have no grey conversion ({exc})") from None
    return _stretched(grey, steps)


def _over_background(picture: Image.Image, steps: Preprocessing) -> Image.Image:
    rgba = picture.convert("RGBA")
    if steps.grey == "mean":
        values = np.asarray(rgba, dtype=np.uint32)
        grey = (values[..., :3].sum(axis=2) + 1) // 3
        alpha = values[..., 3]
    else:
        grey_alpha = np.asarray(rgba.convert("LA"), dtype=np.uint32)
        grey, alpha = grey_alpha[..., 0], grey_alpha[..., 1]
    background = 255 if steps.alpha == "white" else 0
    blended = (grey * alpha + background * (255 - alpha) + 127) // 255
    return Image.fromarray(blended.astype(np.uint8))


def _wide_grey(picture: Image.Image, steps: Preprocessing) -> Image.Image:
    """16-bit, 32-bit integer and float grey images."""
    values = np.asarray(picture)
    if steps.depth == "stretch":
        return _stretch(values.astype(np.float64))
    if picture.mode in _SIXTEEN_BIT_MODES:
        wide = values.astype(np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    raise ImageError(
        BAD_DEPTH,
        f"{picture.mode!r} pixels (32-bit {'float' if picture.mode == 'F' else 'integer'}) have "
        "no agreed 0..255 scale; set images.depth=stretch when training, or save 8- or 16-bit",
    )


def _stretched(grey: Image.Image, steps: Preprocessing) -> Image.Image:
    if steps.depth != "stretch":
        return grey
    return _stretch(np.asarray(grey, dtype=np.float64))


def _stretch(values: np.ndarray) -> Image.Image:
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if high <= low:
        return Image.fromarray(np.zeros(values.shape, dtype=np.uint8))
    scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) / (high - low)
    return Image.fromarray(np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8))


def _upright(grey: Image.Image, picture: Image.Image) -> Image.Image:
    if picture.format != "TIFF" and "exif" not in picture.info:
        return grey  # no EXIF block, so no orientation (TIFF keeps it among its own tags)
    try:
        orientation = picture.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block: the pixels themselves are fine, keep them as stored
        return grey
    method = _ORIENTATIONS.get(orientation) if isinstance(orientation, int) else None
    return grey.transpose(method) if method is not None else grey


def _fit(grey: Image.Image, steps: Preprocessing) -> np.ndarray:
    width, height = grey.size
    side = IMAGE_SIDE
    if steps.aspect == "exact":
        fitted = grey
    elif steps.aspect == "stretch":
        fitted = grey.resize((side, side), _FILTERS[steps.resize])
    elif steps.aspect == "crop":
        short = min(width, height)
        left, top = (width - short) / 2, (height - short) / 2
        fitted = grey.resize(
            (side, side), _FILTERS[steps.resize], box=(left, top, left + short, top + short)
        )
    else:  # pad: scale the whole image into the square, background around it
        scale = side / max(width, height)
        inner = (max(1, round(width * scale)), max(1, round(height * scale)))
        fitted = grey.resize(inner, _FILTERS[steps.resize])
        if inner != (side, side):
            canvas = Image.new("L", (side, side), 0)
            canvas.paste(fitted, ((side - inner[0]) // 2, (side - inner[1]) // 2))
            fitted = canvas
    return np.array(fitted, dtype=np.uint8).reshape(IMAGE_PIXELS)  # a writable copy


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
