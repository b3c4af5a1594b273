"""decode_batch: raw, JSON and image-file records to one image array, every invalid record with a
reason."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from detector.preprocess import ImageDecoding, Preprocessing
from streams.codec import MAX_ID_BYTES, REASONS, decode_batch, encode_images
from tests.image_files import NOISE, encode, hostile_files


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


# --- poison records (issue 9, finding 5): each one dead-lettered on its own, with a reason -------


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _good(i: int = 0) -> bytes:
    return json.dumps({"b64": base64.b64encode(_images(1, seed=i)[0].tobytes()).decode()}).encode()


def _reasons(values: list, **kwargs) -> dict[int, str]:
    decoded = decode_batch(values, codec="json", **kwargs)
    assert decoded.n_valid == int(decoded.valid.sum())
    assert set(decoded.errors) == set(np.flatnonzero(~decoded.valid).tolist())
    return {i: reason for i, (reason, _) in decoded.errors.items()}


@pytest.mark.parametrize(
    "poison",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"pixels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"id": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b', "b64": ""}',
    ],
)
def test_deep_nesting_is_one_bad_record_not_a_failed_batch(poison: bytes) -> None:
    decoded = decode_batch([_good(1), poison, _good(2)], codec="json")
    assert decoded.valid.tolist() == [True, False, True]
    assert decoded.errors[1] == ("bad_json", "nested too deeply")


def test_booleans_are_not_pixels() -> None:
    pixels = [0] * 784
    values = [
        _json({"pixels": [True] * 784}),
        _json({"pixels": [True, *pixels[1:]]}),
        _json({"pixels": [*pixels[:-1], False]}),
        _json({"pixels": pixels, "id": "true false"}),
    ]
    decoded = decode_batch(values, codec="json")
    assert {i: r for i, (r, _) in decoded.errors.items()} == {
        0: "bad_schema",
        1: "bad_schema",
        2: "bad_schema",
    }
    assert "true/false" in decoded.errors[1][1]
    assert decoded.ids == ["true false"]


@pytest.mark.parametrize(
    "value",
    [
        b'{"b64": "", "id": NaN}',
        b'{"b64": "", "id": Infinity}',
        b'{"b64": "", "id": -Infinity}',
        b'{"b64": "", "id": 1e400}',
        b'{"b64": "", "id": true}',
        b'{"b64": "", "id": [1]}',
        b'{"b64": "", "id": {"a": 1}}',
        b'{"b64": "", "id": "\\ud800"}',
        ('{"b64": "", "id": "' + "x" * 2000 + '"}').encode(),
        ('{"b64": "", "id": "' + "\u00e9" * 300 + '"}').encode(),  # 6 bytes each as JSON
        ('{"b64": "", "id": ' + "9" * 1100 + "}").encode(),
        ('{"b64": "", "id": ' + "9" * 4000 + "}").encode(),
    ],
)
def test_an_id_that_cannot_go_into_an_alert_is_a_dead_letter(value: bytes) -> None:
    value = value.replace(
        b'"b64": ""', f'"b64": "{base64.b64encode(bytes(784)).decode()}"'.encode()
    )
    decoded = decode_batch([value, _good()], codec="json")
    assert decoded.valid.tolist() == [False, True]
    assert decoded.errors[0][0] == "bad_id" and decoded.errors[0][1]


def test_ids_that_fit_are_kept_and_are_valid_json() -> None:
    b64 = base64.b64encode(bytes(784)).decode()
    ids = ["x" * (MAX_ID_BYTES - 2), -(10**300), 1.5e300, "日本", "", 0]
    decoded = decode_batch([_json({"b64": b64, "id": i}) for i in ids], codec="json")
    assert decoded.valid.all()
    assert decoded.ids == ids
    for record_id in decoded.ids:
        json.dumps(record_id, allow_nan=False)


def test_duplicate_keys_are_ambiguous() -> None:
    zeros, ones = [0] * 784, [1] * 784
    value = b'{"pixels": %s, "pixels": %s}' % (_json(zeros), _json(ones))
    decoded = decode_batch([value, _good()], codec="json")
    assert decoded.errors[0] == ("bad_schema", "duplicate key 'pixels'")
    assert decoded.valid.tolist() == [False, True]


def test_numbers_beyond_every_type_are_out_of_range() -> None:
    zeros = [0] * 783
    values = [
        _json({"pixels": [10**30, *zeros]}),
        _json({"pixels": [2**63, *zeros]}),
        _json({"pixels": [-(2**70), *zeros]}),
        ('{"pixels": [1e400, ' + ",".join(["0"] * 783) + "]}").encode(),
        _json({"pixels": [-0.0, *zeros]}),
        _json({"pixels": [255.0, *zeros]}),
    ]
    assert _reasons(values) == {
        0: "out_of_range",
        1: "out_of_range",
        2: "out_of_range",
        3: "not_finite",
    }


def test_huge_integers_beside_floats_are_out_of_range_not_bad_schema() -> None:
    """numpy keeps an int beyond int64 as an object when floats share its list: still a number
    outside 0..255, not a non-number."""
    zeros = ",".join(["0"] * 782)
    values = [
        f'{{"pixels": [{big}, {other}, {zeros}]}}'.encode()
        for big, other in [(10**30, 1.0), (10**400, 0.5), (-(10**30), 1.0)]
    ]
    assert _reasons([_good(), *values]) == {1: "out_of_range", 2: "out_of_range", 3: "out_of_range"}


@pytest.mark.parametrize(
    "key",
    ["x" * 1000, "\\u0001" * 300, "\U0001f600" * 300, "\\ud800" * 100],
)
def test_a_duplicate_key_detail_stays_within_200_characters(key: str) -> None:
    value = f'{{"{key}": 1, "{key}": 2}}'.encode()
    decoded = decode_batch([value], codec="json")
    reason, detail = decoded.errors[0]
    assert reason == "bad_schema" and detail.startswith("duplicate key")
    assert len(detail) <= 200
    detail.encode("utf-8")  # a header value: no lone surrogates


def test_a_huge_string_among_the_pixels_is_rejected_without_a_huge_array() -> None:
    value = _json({"pixels": ["x" * 1_000_000, *[0] * 783]})
    # numpy would widen all 100 x 784 cells to a million characters (300+ GB) in one batch array.
    assert _reasons([value] + [_json({"pixels": [0] * 784})] * 99) == {0: "bad_schema"}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "bad_json"),
        (b"\xef\xbb\xbf{}", "bad_schema"),  # json reads past a UTF-8 byte order mark
        (b"\xff\xfe", "bad_json"),
        (b"null", "bad_schema"),
        (b"1", "bad_schema"),
        (b'{"pixels": null}', "bad_schema"),
        (b'{"pixels": [[0]]}', "wrong_length"),
        (b'{"b64": 5}', "bad_schema"),
        ('{"b64": "\u00e9"}'.encode(), "bad_base64"),
        (_json({"pixels": [[0]] * 784}), "bad_schema"),
        (_json({"pixels": [None] * 784}), "bad_schema"),
        (_json({"pixels": [{}] * 784}), "bad_schema"),
    ],
)
def test_odd_values_each_get_their_reason(value: bytes, reason: str) -> None:
    assert _reasons([_good(), value]) == {1: reason}


def test_keys_over_the_limit_are_dead_letters_and_ids_stay_aligned() -> None:
    from streams.codec import MAX_KEY_BYTES

    b64 = base64.b64encode(bytes(784)).decode()
    values = [_json({"b64": b64, "id": i}) for i in range(4)]
    keys = [b"k", b"x" * (MAX_KEY_BYTES + 1), None, b"x" * MAX_KEY_BYTES]
    decoded = decode_batch(values, codec="json", keys=keys)
    assert decoded.valid.tolist() == [True, False, True, True]
    assert decoded.errors[1][0] == "bad_key" and str(MAX_KEY_BYTES + 1) in decoded.errors[1][1]
    assert decoded.ids == [0, 2, 3] and decoded.images.shape == (3, 784)
    raw = decode_batch([bytes(784), bytes(784)], codec="raw", keys=[b"x" * 10**6, b"k"])
    assert raw.valid.tolist() == [False, True] and raw.images.shape == (1, 784)


# --- property: whatever the bytes, decode_batch accounts for every record and never raises ------

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
)
_json_value = st.recursive(
    _json_leaf,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=10,
)
_pixel = st.one_of(
    st.integers(0, 255),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.sampled_from([None, "1", [1]]),
)


def _id_is_usable(record_id: object) -> bool:
    """The rule for ids, written out plainly: a string of valid Unicode or a finite number, at
    most MAX_ID_BYTES as JSON text; or null."""
    if record_id is None:
        return True
    if isinstance(record_id, bool) or not isinstance(record_id, str | int | float):
        return False
    if isinstance(record_id, float) and not np.isfinite(record_id):
        return False
    if isinstance(record_id, str):
        try:
            record_id.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return len(json.dumps(record_id)) <= MAX_ID_BYTES


def _pixel_is_usable(pixel: object) -> bool:
    if type(pixel) is int:  # np.isfinite refuses ints beyond int64
        return 0 <= pixel <= 255
    return type(pixel) is float and math.isfinite(pixel) and 0 <= pixel <= 255 and pixel % 1 == 0


@st.composite
def _record(draw: st.DrawFn) -> tuple[bytes | None, np.ndarray | None]:
    """A record value, and the image it must decode to (None: it must be a dead letter; for
    values of no known shape, `...`: either)."""
    kind = draw(st.sampled_from(["pixels", "near", "b64", "json", "bytes", "none", "deep"]))
    obj: dict = {}
    usable = True
    if draw(st.booleans()):
        obj["id"] = draw(_json_value)
        usable = _id_is_usable(obj["id"])
    if kind == "pixels":
        seed = draw(st.integers(0, 2**32 - 1))  # drawing 784 integers one by one is slow
        image = np.random.default_rng(seed).integers(0, 256, 784).astype(np.uint8)
        obj["pixels"] = image.tolist()
    elif kind == "near":  # 784 pixels, one of them odd
        pixels = [0] * 784
        where, pixel = draw(st.integers(0, 783)), draw(_pixel)
        pixels[where] = pixel
        obj["pixels"] = pixels
        usable = usable and _pixel_is_usable(pixel)
        image = np.zeros(784, np.uint8)
        if usable:
            image[where] = int(pixel)
    elif kind == "b64":
        raw = draw(st.binary(min_size=782, max_size=786))
        obj["b64"] = base64.b64encode(raw).decode()
        usable = usable and len(raw) == 784
        image = np.frombuffer(raw, np.uint8) if usable else None
    elif kind == "json":
        return json.dumps(draw(_json_value)).encode(), None  # never an object with pixels
    elif kind == "bytes":
        return draw(st.binary(max_size=50)), ...  # 784 random bytes are not drawn
    elif kind == "none":
        return None, None
    else:
        depth = draw(st.sampled_from([10, 990, 5_000, 100_000]))
        return b'{"x": ' + b"[" * depth + b"]" * depth + b"}", None
    # NaN and Infinity included, as Python writes them
    return json.dumps(obj).encode(), image if usable else None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(_record(), max_size=12), codec=st.sampled_from(["json", "raw"]))
def test_decode_batch_never_raises_and_accounts_for_every_record(
    records: list[tuple[bytes | None, np.ndarray | None]], codec: str
) -> None:
    values = [value for value, _ in records]
    decoded = decode_batch(values, codec=codec)
    n = len(values)
    assert decoded.valid.shape == (n,)
    assert set(decoded.errors) == set(np.flatnonzero(~decoded.valid).tolist())
    assert all(reason in REASONS and detail for reason, detail in decoded.errors.values())
    assert all(len(detail) <= 200 for _, detail in decoded.errors.values())
    assert decoded.images.shape == (int(decoded.valid.sum()), 784)
    assert decoded.images.dtype == np.uint8
    if codec == "json" and n:
        assert len(decoded.ids) == decoded.n_valid
        for record_id in decoded.ids:
            assert len(json.dumps(record_id, allow_nan=False)) <= MAX_ID_BYTES
        for i, (_, expected) in enumerate(records):
            if expected is ...:
                continue
            assert decoded.valid[i] == (expected is not None), (i, decoded.errors.get(i))
            if expected is not None:
                np.testing.assert_array_equal(
                    decoded.images[int(decoded.valid[:i].sum())], expected
                )


# -- the image codec ------------------------------------------------------------------------------

IMAGE_DECODING = ImageDecoding(Preprocessing(), threads=2)
_IMAGE_SEEDS = tuple(encode(Image.fromarray(NOISE), fmt) for fmt in ("PNG", "JPEG", "WEBP"))


def test_image_round_trip_of_28x28_pngs_keeps_every_pixel() -> None:
    images = _images(5)
    values = encode_images(images, codec="image")
    assert all(value.startswith(b"\x89PNG") for value in values)
    decoded = decode_batch(values, codec="image", images=IMAGE_DECODING)
    assert decoded.valid.all() and not decoded.errors and decoded.ids is None
    np.testing.assert_array_equal(decoded.images, images)


def test_every_hostile_image_record_is_a_dead_letter_with_its_reason_in_order() -> None:
    hostile = hostile_files()
    good = encode_images(_images(3), codec="image")
    values = [good[0], None, *(data for data, _ in hostile.values()), good[1], good[2]]
    keys = [None, b"k", *([b"x"] * len(hostile)), b"y" * 5000, None]
    decoded = decode_batch(values, codec="image", keys=keys, images=IMAGE_DECODING)
    reasons = [decoded.errors[i][0] if i in decoded.errors else None for i in range(len(values))]
    assert reasons == [None, "null_value", *(r for _, r in hostile.values()), "bad_key", None]
    assert all(reason in REASONS for reason in filter(None, reasons))
    assert all(0 < len(detail) <= 200 for _, detail in decoded.errors.values())
    np.testing.assert_array_equal(decoded.images, _images(3)[[0, 2]])


def test_the_image_codec_needs_the_bundles_preprocessing() -> None:
    with pytest.raises(ValueError, match="preprocessing"):
        decode_batch([b"x"], codec="image")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.lists(
        st.one_of(st.none(), st.binary(max_size=40), st.sampled_from(_IMAGE_SEEDS)),
        max_size=10,
    ),
    cut=st.integers(0, 300),
)
def test_image_batches_never_raise_and_account_for_every_record(
    records: list[bytes | None], cut: int
) -> None:
    values = [r[: max(1, len(r) - cut)] if r and r.startswith(b"\x89") else r for r in records]
    decoded = decode_batch(values, codec="image", images=IMAGE_DECODING)
    assert decoded.valid.shape == (len(values),)
    assert set(decoded.errors) == set(np.flatnonzero(~decoded.valid).tolist())
    assert all(reason in REASONS for reason, _ in decoded.errors.values())
    assert decoded.images.shape == (int(decoded.valid.sum()), 784)
