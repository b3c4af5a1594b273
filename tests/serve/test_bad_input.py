"""Every bad input gets a 4xx JSON error naming the problem, never a 500 or a traceback; a flood
of concurrent requests gets 503s with Retry-After, not a crash or unbounded memory."""

from __future__ import annotations

import base64
import io
import json
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.preprocess import ImageDecoding, Preprocessing
from serve.errors import InputError
from serve.images import decode_json_images
from streams.codec import decode_batch
from tests.image_files import hostile_files
from tests.serve.conftest import LIMITS
from tests.serve.http_helpers import Answer, get, multipart, png, post_json, request

BLANK = [0] * 784


def _json(payload: object) -> tuple[bytes, str]:
    return json.dumps(payload).encode(), "application/json"


def _bomb() -> bytes:
    """A PNG whose header claims 400 million pixels: Pillow refuses to decode it."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.float32)).save(buffer, format="TIFF")
    return buffer.getvalue()


def _files(*files: tuple[str, bytes]) -> tuple[bytes, str]:
    return multipart(list(files))


CASES = {
    "not an image": ("/v1/score", _files(("notes.png", b"these are words, not pixels")), 400,
                     "not_an_image"),
    "decompression bomb": ("/v1/score", _files(("bomb.png", _bomb())), 413, "too_large"),
    "a float TIFF named .png": ("/v1/score", _files(("f.png", _tiff())), 400, "bad_depth"),
    "a bad file among good ones": ("/v1/explain", _files(("a.png", png(BLANK)),
                                                         ("b.gif", b"GIF89a")), 400,
                                   "corrupt_image"),
    "a broken image as the body": ("/v1/score", (b"\xff\xd8\xff\xe0", "image/jpeg"), 400,
                                   "corrupt_image"),
    "wrong number of pixels": ("/v1/score", _json({"images": [[0] * 783]}), 400, "wrong_length"),
    "too many images": ("/v1/score", _json({"images": [BLANK] * 65}), 413, "too_many_images"),
    "too many files": ("/v1/explain", _files(*[(f"{i}.png", png(np.zeros(784))) for i in
                                               range(65)]), 413, "too_many_images"),
    "no images": ("/v1/score", _json({"images": []}), 400, "no_images"),
    "bad base64": ("/v1/score", _json({"images": ["not*base64!"]}), 400, "bad_base64"),
    "base64 of the wrong length": ("/v1/score", _json({"images": [base64.b64encode(b"x" * 10)
                                                                  .decode()]}), 400,
                                   "wrong_length"),
    "bad JSON": ("/v1/score", (b'{"images": [', "application/json"), 400, "bad_json"),
    "JSON without images": ("/v1/score", _json({"pixels": BLANK}), 400, "bad_schema"),
    "images not a list": ("/v1/score", _json({"images": "abc"}), 400, "bad_schema"),
    "an image of the wrong type": ("/v1/score", _json({"images": [7]}), 400, "bad_schema"),
    "pixels of the wrong type": ("/v1/score", _json({"images": [["a"] * 784]}), 400,
                                 "bad_schema"),
    "float pixels": ("/v1/score", _json({"images": [[0.5] * 784]}), 400, "not_integer"),
    "true/false pixels": ("/v1/score", _json({"images": [[True] * 784]}), 400, "bad_schema"),
    "NaN pixels": ("/v1/score", _json({"images": [[float("nan")] * 784]}), 400, "not_finite"),
    "pixels out of range": ("/v1/score", _json({"images": [[300] * 784]}), 400, "out_of_range"),
    "unsupported media type": ("/v1/score", (b"abc", "text/plain"), 415,
                               "unsupported_media_type"),
    "sample n of the wrong type": ("/v1/sample", _json({"n": "many"}), 422, "invalid_request"),
    "sample n too large": ("/v1/sample", _json({"n": 10_000}), 413, "too_many_images"),
    "sample unknown field": ("/v1/sample", _json({"count": 3}), 422, "invalid_request"),
    "interpolate one end": ("/v1/interpolate", _json({"seeds": [1]}), 400, "bad_request"),
    "interpolate too many steps": ("/v1/interpolate", _json({"seeds": [1, 2], "steps": 1000}),
                                   413, "too_many_images"),
    "interpolate bad image": ("/v1/interpolate", _json({"images": ["@@", BLANK]}), 400,
                              "bad_base64"),
    "explain PNG of two images": ("/v1/explain?image=heatmap", _json({"images": [BLANK] * 2}),
                                  400, "one_image_for_png"),
}  # fmt: skip


def _assert_error(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer.body
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error["code"] == code, error
    assert error["message"] and "Traceback" not in answer.body.decode()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_its_4xx(service_url: str, case: str) -> None:
    path, payload, status, code = CASES[case]
    body, content_type = payload
    _assert_error(
        request(service_url, "POST", path, body=body, content_type=content_type), status, code
    )


HOSTILE = hostile_files()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_every_hostile_image_file_gets_the_reason_the_worker_dead_letters_it_with(
    service_url: str, name: str
) -> None:
    data, reason = HOSTILE[name]
    body, content_type = multipart([(f"{name}.img", data)])
    answer = request(service_url, "POST", "/v1/score", body=body, content_type=content_type)
    _assert_error(answer, 413 if reason == "too_large" else 400, reason)
    assert answer.json()["error"]["message"].startswith(f"{name}.img: ")
    decoded = decode_batch([data], codec="image", images=ImageDecoding(Preprocessing()))
    assert decoded.errors[0][0] == reason


# Image values the HTTP API and the worker's json codec must read alike: the same image, or the
# same reason (the HTTP error code is the dead-letter reason).
_RANDOM = np.random.default_rng(0).integers(0, 256, 784, dtype=np.uint8)
SHARED_VALUES = {
    "pixels": _RANDOM.tolist(),
    "28 rows of 28": _RANDOM.reshape(28, 28).tolist(),
    "whole floats": [float(v) for v in _RANDOM],
    "standard base64": base64.b64encode(_RANDOM.tobytes()).decode(),
    "URL-safe base64": base64.urlsafe_b64encode(_RANDOM.tobytes()).decode(),
    "base64 in white space": " " + base64.b64encode(_RANDOM.tobytes()).decode() + "\n",
    "bad base64": "not*base64!",
    "short base64": base64.b64encode(b"x" * 10).decode(),
    "783 pixels": [0] * 783,
    "a pixel of 256": [256] + [0] * 783,
    "a fraction": [0.5] + [0] * 783,
    "a string": ["a"] + [0] * 783,
    "a boolean": [True] + [0] * 783,
    "a number": 7,
}


@pytest.mark.parametrize("case", list(SHARED_VALUES))
def test_http_and_the_worker_read_an_image_value_alike(case: str) -> None:
    value = SHARED_VALUES[case]
    field = "b64" if isinstance(value, str) else "pixels"
    record = decode_batch([json.dumps({field: value}).encode()], codec="json")
    try:
        over_http = decode_json_images({"images": [value]}, limit=4)
    except InputError as exc:
        assert not record.n_valid, exc.message
        assert exc.code == record.errors[0][0]
        return
    assert record.n_valid == 1, record.errors
    assert np.array_equal(over_http, record.images)
    assert np.array_equal(over_http[0], _RANDOM)


def test_a_body_over_the_limit_gets_413_declared_or_chunked(service_url: str) -> None:
    big = json.dumps({"images": [BLANK] * 600}).encode()
    assert len(big) > LIMITS["max_body_bytes"]
    declared = request(service_url, "POST", "/v1/score", body=big, content_type="application/json")
    _assert_error(declared, 413, "body_too_large")
    chunked = request(
        service_url, "POST", "/v1/score", body=big, content_type="application/json", chunked=True
    )
    _assert_error(chunked, 413, "body_too_large")


def test_unknown_routes_and_methods_get_json_errors(service_url: str) -> None:
    _assert_error(get(service_url, "/v1/nothing"), 404, "not_found")
    _assert_error(get(service_url, "/v1/score"), 405, "method_not_allowed")
    _assert_error(get(service_url, "/v1/alerts/stream"), 404, "live_alerts_off")


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def test_a_flood_of_requests_gets_503s_not_a_crash(start_service, trained_bundle: Path) -> None:
    server = start_service(
        trained_bundle, max_queue_images=8, max_batch_size=4, max_batch_delay_ms=5, retry_after_s=2
    )
    payload = {"images": [BLANK]}
    post_json(server.url, "/v1/score", payload)  # warm up
    before = _rss_mib()
    statuses: list[int] = []
    retry_after: set[str] = set()
    lock = threading.Lock()

    def one(_: int) -> None:
        answer = post_json(server.url, "/v1/score", payload)
        with lock:
            statuses.append(answer.status)
            if answer.status == 503:
                assert answer.error_code() == "overloaded"
                retry_after.add(answer.headers.get("retry-after", ""))

    # The device is busy for the first second of the flood (as with a slow batch), so the
    # queue fills whatever this machine's speed; afterwards requests flow again.
    busy = server.service.model.executor.submit(time.sleep, 1.0)
    with ThreadPoolExecutor(64) as pool:
        list(pool.map(one, range(384)))
    busy.result()
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(503) > 0, "a queue of 8 images should turn some of 64 clients away"
    assert statuses.count(200) > 0
    assert retry_after == {"2"}
    assert _rss_mib() - before < 200
    # Still serving, and it counted what it turned away.
    assert post_json(server.url, "/v1/score", payload).status == 200
    assert get(server.url, "/readyz").status == 200
    metrics = get(server.url, "/metrics").body.decode()
    rejected = next(
        line for line in metrics.splitlines() if line.startswith("vaewatch_serve_rejected_total")
    )
    assert float(rejected.split()[-1]) == statuses.count(503)
