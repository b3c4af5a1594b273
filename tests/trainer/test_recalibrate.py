"""`vaewatch recalibrate`: same weights, new threshold on fresh normal data, a new bundle.

Real Fashion-MNIST test images of the normal class, moved one pixel to the right and made 20 %
brighter (a shift under which a T-shirt is still a T-shirt), play the "drifted but normal"
traffic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detector import Detector, load_bundle
from tests.fixtures_model import CPU, CPU_FP32, SMALL_BUNDLE_NORMAL_CLASS, FashionMNIST
from trainer.recalibrate import recalibrate_bundle
from vaewatch.cli import main

pytestmark = pytest.mark.slow


def shifted(images: np.ndarray) -> np.ndarray:
    """One pixel to the right, 20 % more contrast: the same garments, camera and light moved."""
    moved = np.roll(images.reshape(-1, 28, 28), 1, axis=2).reshape(len(images), 784)
    return np.clip(np.round(moved.astype(np.float32) * 1.2), 0, 255).astype(np.uint8)


def _shifted_normal(fashion_mnist: FashionMNIST) -> tuple[np.ndarray, np.ndarray]:
    """(calibration half, held-out half) of the shifted normal test images."""
    test = fashion_mnist.test
    normal = shifted(test.images[test.labels == SMALL_BUNDLE_NORMAL_CLASS])
    order = np.random.default_rng(0).permutation(len(normal))
    half = len(normal) // 2
    return normal[order[:half]], normal[order[half:]]


def test_recalibration_restores_the_target_fpr_on_shifted_normal_data(
    trained_bundle: Path, fashion_mnist: FashionMNIST, tmp_path: Path
) -> None:
    calibrate_on, held_out = _shifted_normal(fashion_mnist)
    old = Detector.from_bundle(trained_bundle, CPU)
    old_fpr = float(old.score(held_out).anomalous.mean())
    target = old.calibration.target_fpr

    new_bundle = recalibrate_bundle(
        trained_bundle, calibrate_on, out=tmp_path / "new", source="test:shifted"
    )
    new = Detector.from_bundle(tmp_path / "new", CPU)
    new_fpr = float(new.score(held_out).anomalous.mean())

    # The old threshold no longer holds on the shifted data; the new one does (within the
    # binomial noise of 500 held-out images and the Beta spread of one calibration draw).
    assert old_fpr > 4 * target, old_fpr
    assert new_fpr <= 3 * target, new_fpr
    assert new.version == new_bundle.version != old.version
    assert new.calibration.n == len(calibrate_on)
    # Same weights: the raw scores are bit-identical, only the decision rule moved (in one
    # precision: `auto` may pick int8 for one bundle and not for the other, each validated on
    # its own calibration images; int8 keeps the activation ranges of training: its scores too).
    for precision in ("fp32", "int8"):
        settings = CPU.model_copy(update={"precision": precision})
        old_scores = Detector.from_bundle(trained_bundle, settings).score(held_out).scores
        new_scores = Detector.from_bundle(tmp_path / "new", settings).score(held_out).scores
        np.testing.assert_array_equal(old_scores, new_scores)
    manifest = json.loads((tmp_path / "new" / "bundle.json").read_text())
    assert manifest["metadata"]["recalibrated_from"] == old.version
    assert manifest["metadata"]["calibration_source"]["source"] == "test:shifted"
    assert manifest["metadata"]["calibration_source"]["n_images"] == len(calibrate_on)
    assert manifest["metadata"]["data"] == load_bundle(trained_bundle).metadata["data"]


def test_cli_recalibrates_from_a_file_and_keeps_only_the_normal_classes(
    trained_bundle: Path, fashion_mnist: FashionMNIST, tmp_path: Path, capsys
) -> None:
    test = fashion_mnist.test
    npz = tmp_path / "fresh.npz"
    np.savez(npz, x=shifted(test.images[:3000]), y=test.labels[:3000])
    n_normal = int((test.labels[:3000] == SMALL_BUNDLE_NORMAL_CLASS).sum())
    out = tmp_path / "recal"
    code = main(
        ["recalibrate", "--model", str(trained_bundle), "--data", str(npz), "--out", str(out)]
    )
    assert code == 0
    bundle = load_bundle(out)
    assert bundle.calibration.n == n_normal
    assert bundle.metadata["calibration_source"]["source"] == str(npz)
    assert bundle.version in capsys.readouterr().out


def test_cli_recalibrates_from_a_dataset_spec_with_another_target(
    trained_bundle: Path, tmp_path: Path
) -> None:
    npz = load_bundle(trained_bundle).metadata["data"]["dataset"]
    out = tmp_path / "recal"
    args = ["recalibrate", "--model", str(trained_bundle), "--data", npz, "--split", "test"]
    assert main([*args, "--out", str(out), "--target-fpr", "0.05"]) == 0
    bundle = load_bundle(out)
    assert bundle.calibration.target_fpr == 0.05
    assert bundle.calibration.n == 1000  # the normal class of the real test split
    assert bundle.metadata["calibration_source"]["split"] == "test"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-fpr", "1.5"], "--target-fpr must lie in (0, 1)"),
        (["--data", "kafka:"], "expected kafka:TOPIC"),
        (["--data", "missing.npy"], "missing.npy: no such file"),
    ],
)
def test_cli_bad_arguments_are_one_line_errors(
    trained_bundle: Path, tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    args = ["recalibrate", "--model", str(trained_bundle), "--out", str(tmp_path / "o")]
    if "--data" not in extra:
        args += ["--data", "fashion-mnist"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaewatch: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_too_few_images_for_the_target_is_an_error(
    trained_bundle: Path, fashion_mnist: FashionMNIST, tmp_path: Path, capsys
) -> None:
    npy = tmp_path / "few.npy"
    np.save(npy, fashion_mnist.test.images[:50])
    args = ["recalibrate", "--model", str(trained_bundle), "--data", str(npy)]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "too few" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["few.npy"]  # no staging directory left


def test_refuses_to_overwrite_a_bundle(trained_bundle: Path, tmp_path: Path, capsys) -> None:
    args = ["recalibrate", "--model", str(trained_bundle), "--data", "fashion-mnist"]
    assert main([*args, "--out", str(trained_bundle)]) == 2
    assert "already exists" in capsys.readouterr().err
    load_bundle(trained_bundle)  # untouched


def test_cli_recalibrates_from_a_kafka_topic_range(
    trained_bundle: Path, fashion_mnist: FashionMNIST, kafka_broker, tmp_path: Path, capsys
) -> None:
    """A replay of offsets 0-301 of a real topic: 300 images and one undecodable record (skipped
    and counted); the records after the range are not read."""
    from streams.codec import encode_images
    from tests.fixtures_broker import make_topics
    from tests.streams.kafka_helpers import produce_values

    topics = make_topics(kafka_broker)
    test = fashion_mnist.test
    normal = shifted(test.images[test.labels == SMALL_BUNDLE_NORMAL_CLASS][:500])
    values = encode_images(normal, codec="raw")
    produce_values(topics.config, [*values[:300], b"not an image", *values[300:]])
    source = f"kafka:{topics.config.input_topic}:0:0-301"
    args = [*topics.settings_args(), "recalibrate", "--model", str(trained_bundle)]
    assert main([*args, "--data", source, "--out", str(tmp_path / "k")]) == 0
    bundle = load_bundle(tmp_path / "k")
    assert bundle.calibration.n == 300
    recorded = bundle.metadata["calibration_source"]
    assert recorded == {
        "source": source,
        "n_images": 300,
        "offsets": {"0": [0, 301]},
        "n_invalid": 1,
    }
    # In fp32, recalibration's reference precision.
    expected = Detector.from_bundle(trained_bundle, CPU_FP32).score(normal[:300]).scores
    np.testing.assert_array_equal(bundle.calibration.scores, np.sort(expected.astype(np.float64)))

    too_far = f"kafka:{topics.config.input_topic}:0:0-9999"
    assert main([*args, "--data", too_far, "--out", str(tmp_path / "x")]) == 2
    assert "partition 0 ends at offset" in capsys.readouterr().err
    missing = f"kafka:{topics.config.input_topic}-none"
    assert main([*args, "--data", missing, "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
