"""The one preprocessing (detector/preprocess.py): image files of every format, mode and size to
the model's 784 uint8 values, each step as its setting says, and every hostile file refused with
its reason, never an exception of another kind."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from detector.preprocess import (
    LEGACY_PREPROCESSING,
    ImageDecoding,
    ImageError,
    ImageSettings,
    Preprocessing,
    preprocess_image,
    preprocess_images,
)
from tests.image_files import NOISE, PIXELS, encode, exif_rotated_jpeg, hostile_files, png_of_size

DEFAULT = ImageDecoding(Preprocessing())
LEGACY = ImageDecoding(LEGACY_PREPROCESSING)


def decode(data: bytes, decoding: ImageDecoding = DEFAULT, **steps: object) -> np.ndarray:
    if steps:
        decoding = decoding.with_preprocessing(decoding.preprocessing.model_copy(update=steps))
    return preprocess_image(data, decoding).reshape(28, 28)


# -- well-formed files ----------------------------------------------------------------------------


@pytest.mark.parametrize("decoding", [DEFAULT, LEGACY], ids=["default", "legacy"])
def test_28x28_grey_in_any_lossless_format_and_mode_is_its_own_pixels(
    decoding: ImageDecoding,
) -> None:
    grey = Image.fromarray(PIXELS)
    wide = Image.fromarray(PIXELS.astype(np.uint16) * 257)
    assert wide.mode.startswith("I;16")
    pictures = [grey, wide, grey.convert("RGB"), grey.convert("LA"), grey.convert("RGBA")]
    for picture in pictures:
        for fmt in ("PNG", "BMP", "TIFF", "WEBP"):
            if fmt == "BMP" and picture.mode not in ("L", "RGB"):
                continue
            if fmt == "WEBP" and picture.mode not in ("RGB", "RGBA"):
                continue
            options = {"lossless": True} if fmt == "WEBP" else {}
            got = decode(encode(picture, fmt, **options), decoding)
            np.testing.assert_array_equal(got, PIXELS, err_msg=f"{fmt} {picture.mode}")


def test_16_bit_samples_round_as_png_defines() -> None:
    # v8 = round(v16 * 255 / 65535): 129 -> 1, 32896 -> 128, 65535 -> 255, 128 -> 0
    wide = np.full((28, 28), 128, np.uint16)
    wide[0, :3] = (129, 32896, 65535)
    for fmt in ("PNG", "TIFF"):
        got = decode(encode(Image.fromarray(wide), fmt))
        assert got[0, :4].tolist() == [1, 128, 255, 0]


def test_a_16_bit_sensor_map_using_12_bits_is_stretched_to_its_own_range() -> None:
    sensor = (NOISE.astype(np.uint16) * 16).astype(np.uint16)  # 0..4080 of 65535
    data = encode(Image.fromarray(sensor), "TIFF")
    scaled = decode(data)
    assert scaled.max() <= 16  # scaled as 16-bit: nearly black
    stretched = decode(data, depth="stretch")
    want = np.round((sensor - sensor.min()) / (sensor.max() - sensor.min()) * 255)
    np.testing.assert_array_equal(stretched, want.astype(np.uint8))


def test_float_and_32_bit_images_need_the_stretch_depth() -> None:
    data = encode(Image.fromarray(NOISE.astype(np.float32) * 3.5), "TIFF")
    with pytest.raises(ImageError) as caught:
        decode(data)
    assert caught.value.reason == "bad_depth" and "images.depth=stretch" in str(caught.value)
    np.testing.assert_array_equal(decode(data, depth="stretch") == 255, NOISE.max() == NOISE)


def test_colour_becomes_luma_or_the_channel_mean() -> None:
    rgb = np.zeros((28, 28, 3), np.uint8)
    rgb[..., 0] = 200  # pure red
    data = encode(Image.fromarray(rgb))
    assert decode(data)[0, 0] == round(200 * 0.299)  # ITU-R 601-2, Pillow's L
    assert decode(data, grey="mean")[0, 0] == round(200 / 3)


def test_palette_bilevel_cmyk_and_lab_files_have_a_grey_conversion() -> None:
    grey = Image.fromarray(PIXELS)
    np.testing.assert_array_equal(decode(encode(grey.convert("P"))), PIXELS)
    bilevel = decode(encode(grey.convert("1")))
    assert set(np.unique(bilevel)) <= {0, 255}
    cmyk = decode(encode(grey.convert("RGB").convert("CMYK"), "JPEG", quality=95))
    assert np.abs(cmyk.astype(int) - PIXELS).mean() < 3  # JPEG's own loss, not a wrong conversion
    lab = decode(encode(grey.convert("RGB").convert("LAB"), "TIFF"))
    assert np.corrcoef(lab.ravel(), PIXELS.ravel())[0, 1] > 0.98


def test_a_png_with_alpha_lies_over_white_black_or_its_hidden_colour() -> None:
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 10  # the colour under the transparency
    rgba[10:18, 10:18] = (60, 60, 60, 255)  # an opaque dark square
    data = encode(Image.fromarray(rgba, "RGBA"))
    over_white = decode(data)
    assert over_white[0, 0] == 255 and over_white[12, 12] == 60
    assert decode(data, alpha="black")[0, 0] == 0
    assert decode(data, alpha="ignore")[0, 0] == 10
    # Half transparent: half way between the colour and the background.
    rgba[..., 3] = 128
    assert decode(encode(Image.fromarray(rgba, "RGBA")))[0, 0] == round(
        (10 * 128 + 255 * 127) / 255
    )


def test_an_exif_rotated_phone_photo_is_turned_upright() -> None:
    upright = np.zeros((280, 140), np.uint8)  # portrait: a bright top half
    upright[:140] = 230
    data = exif_rotated_jpeg(upright)
    assert Image.open(io.BytesIO(data)).size == (280, 140)  # stored landscape
    got = decode(data, aspect="stretch")
    assert got[:10].mean() > 200 and got[-10:].mean() < 30  # top bright, bottom dark
    as_stored = decode(data, aspect="stretch", orientation="stored")
    assert as_stored[:, :10].mean() > 200 or as_stored[:, -10:].mean() > 200


def test_invert_makes_a_light_background_zero() -> None:
    ink = 255 - PIXELS
    np.testing.assert_array_equal(decode(encode(Image.fromarray(ink)), invert=True), PIXELS)


def test_aspect_pad_crop_and_stretch_of_a_wide_image() -> None:
    wide = np.zeros((28, 56), np.uint8)
    wide[:, 28:] = 255  # right half white
    data = encode(Image.fromarray(wide))
    padded = decode(data)
    assert padded[:7].max() == 0 and padded[-7:].max() == 0  # background bands above and below
    assert padded[14, 0] == 0 and padded[14, -1] == 255
    cropped = decode(data, aspect="crop")  # the centre square: half dark, half light
    assert cropped[14, 2] == 0 and cropped[14, -3] == 255
    stretched = decode(data, aspect="stretch")
    assert stretched[0, -1] == 255 and stretched[-1, 0] == 0


def test_padding_is_background_after_inversion() -> None:
    ink_on_white = np.full((28, 56), 255, np.uint8)
    got = decode(encode(Image.fromarray(ink_on_white)), invert=True)
    assert got.max() == 0  # the white page became 0, and so did the padding


def test_a_camera_crop_of_640x480_rgb_jpeg_is_decoded_reduced_and_fitted() -> None:
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    data = encode(Image.fromarray(photo), "JPEG", quality=90)
    got = decode(data)
    assert got.shape == (28, 28)
    assert got[:3].max() == 0 and got[-3:].max() == 0  # 4:3 padded
    assert 80 < got[5:-5].mean() < 175


def test_the_legacy_record_takes_28x28_images_only() -> None:
    data = encode(Image.fromarray(np.zeros((64, 64), np.uint8)), "JPEG")
    with pytest.raises(ImageError) as caught:
        decode(data, LEGACY)
    assert caught.value.reason == "wrong_size" and "64x64" in str(caught.value)
    assert decode(data).shape == (28, 28)


def test_images_settings_record_their_steps_and_decide_invert_elsewhere() -> None:
    settings = ImageSettings(aspect="crop", resize="box", invert="auto", max_pixels=10)
    record = settings.preprocessing(invert=True)
    assert record == Preprocessing(aspect="crop", resize="box", invert=True)
    decoding = settings.decoding(record)
    assert decoding.max_pixels == 10 and decoding.preprocessing is record


# -- hostile files -------------------------------------------------------------------------------

HOSTILE = hostile_files()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_file_is_refused_with_its_reason_in_one_line(name: str) -> None:
    data, reason = HOSTILE[name]
    started = time.monotonic()
    with pytest.raises(ImageError) as caught:
        preprocess_image(data, DEFAULT)
    assert caught.value.reason == reason, str(caught.value)
    assert "\n" not in str(caught.value) and len(str(caught.value)) <= 200
    assert time.monotonic() - started < 5  # refused, not decoded


def test_the_pixel_and_byte_limits_are_checked_before_decoding() -> None:
    small = ImageDecoding(Preprocessing(), max_pixels=28 * 28, max_bytes=10_000)
    with pytest.raises(ImageError, match="29x28 = 812 pixels, over the limit of 784"):
        preprocess_image(png_of_size(29, 28), small)  # one scanline only: decoding would fail
    big = encode(Image.fromarray(NOISE).resize((200, 200)))
    assert len(big) > 10_000
    with pytest.raises(ImageError, match="over the limit of 10000") as caught:
        preprocess_image(big, small)
    assert caught.value.reason == "too_large"


def test_a_large_jpeg_counts_the_pixels_it_is_decoded_at() -> None:
    """libjpeg decodes a 48-megapixel photo at an eighth of its size: 0.75 megapixels, under
    the default limit, where a PNG of that size is refused."""
    photo = Image.new("RGB", (8000, 6000), (90, 90, 90))
    assert decode(encode(photo, "JPEG")).shape == (28, 28)
    with pytest.raises(ImageError, match="8000x6000 = 48000000 pixels, over the limit"):
        decode(png_of_size(8000, 6000))


def test_a_file_that_cannot_be_read_is_named_by_the_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as caught:
        preprocess_image(tmp_path / "missing.png", DEFAULT)
    assert caught.value.reason == "not_an_image" and "cannot read it" in str(caught.value)


_SEEDS = [encode(Image.fromarray(NOISE), fmt) for fmt in ("PNG", "JPEG", "BMP", "TIFF", "GIF")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(_SEEDS),
    cut=st.integers(0, 2000),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)), max_size=6),
)
def test_mangled_files_decode_or_raise_image_error_only(seed: bytes, cut: int, flips: list) -> None:
    data = bytearray(seed[: max(1, len(seed) - cut)])
    for at, mask in flips:
        if at < len(data):
            data[at] ^= mask
    try:
        got = preprocess_image(bytes(data), DEFAULT)
    except ImageError as exc:
        assert exc.reason in ("not_an_image", "corrupt_image", "too_large", "bad_mode")
    else:
        assert got.shape == (784,) and got.dtype == np.uint8


# -- many at once ---------------------------------------------------------------------------------


def test_a_batch_in_threads_matches_one_by_one_and_indexes_its_errors() -> None:
    good = [
        encode(Image.fromarray(np.roll(NOISE, i)).resize((40 + i, 30)), "JPEG") for i in range(9)
    ]
    files = [*good[:4], b"junk", *good[4:], HOSTILE["animated gif"][0]]
    one_by_one = np.stack([preprocess_image(f, DEFAULT) for f in good])
    for threads in (1, 3):
        done = preprocess_images(files, ImageDecoding(Preprocessing(), threads=threads))
        np.testing.assert_array_equal(done.images, one_by_one)
        assert done.valid.tolist() == [True] * 4 + [False] + [True] * 5 + [False]
        assert {i: reason for i, (reason, _) in done.errors.items()} == {
            4: "not_an_image",
            10: "animated",
        }
