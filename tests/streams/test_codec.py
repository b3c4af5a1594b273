"""decode_batch: raw and JSON records to one image array, every invalid record with a reason."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from streams.codec import decode_batch, encode_images


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 784), dtype=np.uint8)


@pytest.mark.parametrize("codec", ["raw", "json"])
def test_round_trip_keeps_every_pixel(codec: str) -> None:
    images = _images(5)
    decoded = decode_batch(encode_images(images, codec=codec, ids=list("abcde")), codec=codec)
    assert decoded.valid.all() and not decoded.errors
    np.testing.assert_array_equal(decoded.images, images)
    assert decoded.images.flags.writeable
    if codec == "json":
        assert decoded.ids == list("abcde")


def test_raw_invalid_records_are_reported_and_the_rest_kept_in_order() -> None:
    images = _images(3)
    values = [images[0].tobytes(), b"short", images[1].tobytes(), None, b"\x00" * 785]
    values.append(images[2].tobytes())
    decoded = decode_batch(values, codec="raw")
    assert decoded.valid.tolist() == [True, False, True, False, False, True]
    np.testing.assert_array_equal(decoded.images, images)
    assert decoded.errors[1][0] == "wrong_length" and "5 bytes" in decoded.errors[1][1]
    assert decoded.errors[3][0] == "null_value"
    assert decoded.errors[4][0] == "wrong_length"


def test_json_malformed_records_each_get_their_reason() -> None:
    good = _images(2)
    pixels = good[0].tolist()
    values = [
        json.dumps({"pixels": pixels, "id": 7}).encode(),
        b"{not json",
        json.dumps([1, 2, 3]).encode(),
        json.dumps({"pixels": pixels[:-1]}).encode(),
        json.dumps({"pixels": [*pixels[:-1], 256]}).encode(),
        json.dumps({"pixels": [*pixels[:-1], -1]}).encode(),
        json.dumps({"pixels": [*pixels[:-1], 1.5]}).encode(),
        ('{"pixels": [' + ",".join(["NaN"] + ["0"] * 783) + "]}").encode(),
        json.dumps({"b64": "!!!"}).encode(),
        json.dumps({"b64": base64.b64encode(b"\x01" * 10).decode()}).encode(),
        json.dumps({"other": 1}).encode(),
        json.dumps({"pixels": ["a"] * 784}).encode(),
        json.dumps({"b64": base64.b64encode(good[1].tobytes()).decode()}).encode(),
        b"\xff\xfe",
    ]
    decoded = decode_batch(values, codec="json")
    reasons = {i: reason for i, (reason, _) in decoded.errors.items()}
    assert reasons == {
        1: "bad_json",
        2: "bad_schema",
        3: "wrong_length",
        4: "out_of_range",
        5: "out_of_range",
        6: "not_integer",
        7: "not_finite",
        8: "bad_base64",
        9: "wrong_length",
        10: "bad_schema",
        11: "bad_schema",
        13: "bad_json",
    }
    np.testing.assert_array_equal(decoded.images, good)
    assert decoded.ids == [7, None]


def test_json_float_pixels_that_are_whole_numbers_are_accepted() -> None:
    row = [float(v) for v in range(256)] * 3 + [0.0] * 16
    decoded = decode_batch([json.dumps({"pixels": row}).encode()], codec="json")
    assert decoded.valid.all()
    assert decoded.images[0, 255] == 255


def test_empty_batch() -> None:
    decoded = decode_batch([], codec="raw")
    assert decoded.images.shape == (0, 784) and decoded.valid.shape == (0,)
