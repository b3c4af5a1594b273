"""One image file, one score: the same files sent through the four ways in (the training data
path, `vaewatch score`, the worker's image codec, `vaewatch serve`) get the same score, because
each applies the bundle's preprocessing with the one function in detector/preprocess.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector import Detector
from detector.preprocess import ImageSettings
from serve.config import ServeConfig
from serve.server import BackgroundServer, build_service
from streams.kafka_io import create_producer
from tests.fixtures_broker import make_topics, start_worker
from tests.fixtures_model import CPU
from tests.serve.http_helpers import post_files
from tests.streams.kafka_helpers import read_topic
from trainer.config import DataConfig
from trainer.data import load_images

pytestmark = pytest.mark.slow


def camera_files(fashion_mnist, folder: Path) -> dict[str, bytes]:
    """Real Fashion-MNIST images as a user's files: a T-shirt as a 640x480 RGB JPEG on a grey
    desk, turned by EXIF as a phone stores it; a sneaker as a 64x64 JPEG; a bag as a 16-bit
    TIFF; a trouser as a PNG with a transparent background."""
    test = fashion_mnist.test
    first = {label: test.images[np.flatnonzero(test.labels == label)[0]] for label in (0, 1, 7, 8)}
    shirt = Image.fromarray(first[0].reshape(28, 28)).resize((360, 360), Image.Resampling.BICUBIC)
    desk = Image.new("L", (640, 480), 0)
    desk.paste(shirt, (140, 60))
    stored = desk.convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    trouser = Image.fromarray(first[1].reshape(28, 28)).resize((100, 100))
    files = {
        "tshirt-phone.jpg": (stored, {"format": "JPEG", "quality": 90, "exif": exif.tobytes()}),
        "sneaker.jpg": (
            Image.fromarray(first[7].reshape(28, 28)).resize((64, 64), Image.Resampling.BICUBIC),
            {"format": "JPEG", "quality": 90},
        ),
        "bag.tiff": (
            Image.fromarray(first[8].reshape(28, 28).astype(np.uint16) * 257),
            {"format": "TIFF"},
        ),
        "trouser.png": (trouser.convert("LA"), {"format": "PNG"}),
    }
    written = {}
    for name, (picture, options) in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, **options)
        written[name] = path.read_bytes()
    return written


def test_the_same_file_gets_the_same_score_from_training_cli_worker_and_http(
    trained_bundle: Path,
    fashion_mnist,
    kafka_broker,
    tmp_path: Path,
) -> None:
    files = camera_files(fashion_mnist, tmp_path / "photos" / "all")
    names = sorted(files)
    detector = Detector.from_bundle(trained_bundle, CPU)
    assert detector.preprocessing.aspect == "pad"  # a bundle of today records its preprocessing

    # 1. The training path: a folder data set read with the bundle's preprocessing.
    data = DataConfig(dataset=f"folder:{tmp_path / 'photos'}", test_fraction=0.01)
    decoding = ImageSettings().decoding(detector.preprocessing)
    as_training = load_images(data, split="train", decoding=decoding)
    assert [Path(n).name for n in as_training.names] == names
    from_training = dict(
        zip(names, detector.score(as_training.images).scores.tolist(), strict=True)
    )

    # 2. `vaewatch score` on the files.
    done = subprocess.run(
        [sys.executable, "-m", "vaewatch.cli", "--set", "detector.device=cpu", "score",
         "--model", str(trained_bundle), "--format", "jsonl",
         *(str(tmp_path / "photos" / "all" / n) for n in names)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    from_cli = {Path(row["name"]).name: row["score"] for row in rows}

    # 3. The worker, the files as records of the image codec.
    topics = make_topics(kafka_broker, codec="image")
    worker = start_worker(model=trained_bundle, topics=topics, log_dir=tmp_path / "logs")
    try:
        producer = create_producer(config=topics.config)
        for name in names:
            producer.send(
                topics.config.input_topic, value=files[name], headers=[("id", name.encode())]
            )
        producer.flush(timeout=30)
        producer.close()
        records = read_topic(topics.config, topics.config.scores_topic, until=len(names))
    finally:
        assert worker.stop() == 0
    from_worker = {json.loads(r.value)["id"]: json.loads(r.value)["score"] for r in records}

    # 4. `vaewatch serve`, the files uploaded.
    config = ServeConfig(port=0)
    server = BackgroundServer(build_service(trained_bundle, config=config, detector=CPU)).start()
    try:
        answer = post_files(server.url, "/v1/score", [(name, files[name]) for name in names])
    finally:
        server.stop()
    assert answer.status == 200, answer.body
    from_http = {r["name"]: r["score"] for r in answer.json()["results"]}

    for name in names:
        want = from_training[name]
        got = {"cli": from_cli[name], "worker": from_worker[name], "http": from_http[name]}
        for way, score in got.items():
            # Float rounding of batches of other sizes only (docs/http.md): 1e-5 relative.
            assert score == pytest.approx(want, rel=1e-5, abs=1e-4), (name, way, score, want)
