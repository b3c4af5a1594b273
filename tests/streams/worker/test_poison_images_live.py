"""Hostile image files against a real broker and a real `vaewatch worker` with the image codec:
every kind (decompression bombs over vaewatch's and Pillow's pixel limits and over the byte
limit, truncated and broken files, animated images and multi-page TIFFs, 32-bit samples, other
formats, empty values and tombstones) ends as a dead letter with its reason, every other record
of its batch is scored (CMYK and EXIF-turned photos among them), the offsets are committed and
the worker stays up."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.fixtures_broker import make_topics, start_worker
from tests.image_files import NOISE, encode, exif_rotated_jpeg, hostile_files
from tests.streams.kafka_helpers import produce_values, read_topic, wait_committed

pytestmark = pytest.mark.slow


def good_files(n: int) -> list[bytes]:
    """Files of the formats, sizes and modes a camera or a service sends."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 256, (28 + i % 50, 28 + (7 * i) % 90), dtype=np.uint8)
        picture = Image.fromarray(pixels)
        kind = i % 5
        if kind == 0:
            out.append(encode(picture))
        elif kind == 1:
            out.append(encode(picture.convert("RGB"), "JPEG", quality=90))
        elif kind == 2:
            out.append(encode(picture.convert("RGB").convert("CMYK"), "JPEG"))
        elif kind == 3:
            out.append(exif_rotated_jpeg(pixels))
        else:
            out.append(encode(picture.convert("RGBA"), "WEBP"))
    return out


def test_hostile_image_records_are_dead_letters_and_their_batch_is_scored(
    kafka_broker, trained_bundle, tmp_path
) -> None:
    topics = make_topics(kafka_broker, codec="image")
    n = 150
    values: list[bytes | None] = list(good_files(n))
    hostile = hostile_files()
    expected: dict[int, str] = {}
    for offset, (data, reason) in enumerate(hostile.values(), start=40):
        values[offset] = data
        expected[offset] = reason
    values[60] = None  # a tombstone
    expected[60] = "null_value"
    values[61] = encode(Image.fromarray(NOISE).resize((3000, 400)))  # 1.2 MP: over the limit set
    expected[61] = "too_large"
    headers = [[("id", f"img-{i}".encode())] for i in range(n)]
    keys = [b"gone" if value is None else None for value in values]  # a tombstone has a key
    produce_values(topics.config, values, headers=headers, keys=keys)  # type: ignore[arg-type]

    worker = start_worker(
        model=trained_bundle,
        topics=topics,
        log_dir=tmp_path,
        timeout_s=90,  # the scoring process loads torch meanwhile: slow on a busy machine
        extra_args=[
            "--set", "stream.max_batch_size=64",
            "--set", "images.max_pixels=1000000",
            "--set", "images.decode_threads=2",
        ],
    )  # fmt: skip
    try:
        dead = read_topic(topics.config, topics.config.dlq_topic, until=len(expected))
        scores = read_topic(topics.config, topics.config.scores_topic, until=n - len(expected))
        assert wait_committed(topics.config, n, timeout_s=30) == n
        assert worker.process.poll() is None, worker.log()
        metrics = worker.metrics_text()
    finally:
        assert worker.stop() == 0, worker.log()

    letters = {
        int(dict(r.headers)["vaewatch.source.offset"]): (
            dict(r.headers)["vaewatch.error"].decode(),
            dict(r.headers)["vaewatch.error.detail"].decode(),
            r.value,
        )
        for r in dead
    }
    assert {offset: reason for offset, (reason, _, _) in letters.items()} == expected
    for offset, (_, detail, value) in letters.items():
        assert detail and len(detail) <= 200
        assert value == values[offset]  # the file itself, unchanged (a tombstone stays one)
    scored = {s["offset"]: s for s in (json.loads(r.value) for r in scores)}
    assert set(scored) == set(range(n)) - set(expected)
    assert all(scored[i]["id"] == f"img-{i}" for i in scored)
    assert 'vaewatch_dead_letters_total{reason="animated"} 4.0' in metrics
