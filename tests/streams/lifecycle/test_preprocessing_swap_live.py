"""A hot swap changes how the worker's image codec reads files: the preprocessing is the serving
bundle's, so a bundle written before preprocessing was recorded (28 x 28 only) dead-letters a
64 x 64 JPEG, and after the worker swaps to a bundle that records one, the same file is scored
as that bundle scores it offline."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector import Detector, load_bundle, save_bundle
from detector.preprocess import ImageDecoding, preprocess_image
from tests.fixtures_broker import make_topics, start_worker
from tests.fixtures_model import CPU
from tests.streams.kafka_helpers import produce_values, read_topic

pytestmark = pytest.mark.slow


def _flip(link: Path, target: Path) -> None:
    staging = link.with_name(link.name + ".tmp")
    staging.unlink(missing_ok=True)
    staging.symlink_to(target)
    staging.replace(link)


def test_the_image_codec_follows_the_preprocessing_of_the_bundle_swapped_in(
    kafka_broker, trained_bundle: Path, fashion_mnist, tmp_path: Path
) -> None:
    bundle = load_bundle(trained_bundle)
    legacy = tmp_path / "legacy"
    save_bundle(legacy, model=bundle.model, calibration=bundle.calibration)
    link = tmp_path / "current"
    _flip(link, legacy)
    buffer = io.BytesIO()
    image = fashion_mnist.test.images[0].reshape(28, 28)
    Image.fromarray(image).resize((64, 64)).save(buffer, format="JPEG", quality=90)
    photo = buffer.getvalue()

    topics = make_topics(kafka_broker, codec="image")
    worker = start_worker(
        model=link,
        topics=topics,
        log_dir=tmp_path,
        timeout_s=90,
        extra_args=["--set", "lifecycle.watch_interval_s=0.1"],
    )
    try:
        produce_values(topics.config, [photo])
        (dead,) = read_topic(topics.config, topics.config.dlq_topic, until=1)
        assert dict(dead.headers)["vaewatch.error"] == b"wrong_size"
        _flip(link, trained_bundle)
        deadline = time.monotonic() + 60
        while "vaewatch_model_swaps_total 1.0" not in worker.metrics_text():
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.1)
        produce_values(topics.config, [photo])
        (scored,) = read_topic(topics.config, topics.config.scores_topic, until=1)
    finally:
        assert worker.stop() == 0
    result = json.loads(scored.value)
    detector = Detector.from_bundle(trained_bundle, CPU)
    assert result["offset"] == 1 and result["model_version"] == detector.version
    offline = detector.score(preprocess_image(photo, ImageDecoding(detector.preprocessing))[None])
    assert result["score"] == pytest.approx(float(offline.scores[0]), rel=1e-5)
    assert not np.isnan(result["score"])
