"""The batch scorer on a real trained bundle: same scores as the model, any batch split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from detector.bundle import load_bundle
from detector.scorer import Detector, DeviceError, as_image_batch, resolve_device
from tests.fixtures_model import CPU_FP32


@pytest.fixture(scope="module")
def detector(trained_bundle: Path) -> Detector:
    return Detector.from_bundle(trained_bundle, CPU_FP32.model_copy(update={"max_batch_size": 64}))


def test_scores_match_the_model_and_calibration(
    detector: Detector, trained_bundle: Path, fashion_mnist
) -> None:
    images = fashion_mnist.test.images[:300]
    result = detector.score(images)
    model = load_bundle(trained_bundle).model
    with torch.no_grad():
        expected = model.score(torch.from_numpy(images).float() / 255.0).numpy()
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-3)
    assert result.scores.dtype == np.float32
    np.testing.assert_array_equal(result.anomalous, result.scores > detector.threshold)
    np.testing.assert_allclose(result.p_values, detector.calibration.p_values(result.scores))
    assert len(result) == 300


def test_batch_split_does_not_change_scores(detector: Detector, fashion_mnist) -> None:
    images = fashion_mnist.test.images[:200]
    whole = Detector(
        detector.model,
        detector.calibration,
        version="v",
        device="cpu",
        max_batch_size=1000,
        precision=detector.precision,
    )
    np.testing.assert_allclose(
        detector.score(images).scores, whole.score(images).scores, rtol=1e-5, atol=1e-3
    )
    np.testing.assert_array_equal(detector.score(images).scores, detector.score(images).scores)


def test_accepts_28x28_and_empty_batches(detector: Detector, fashion_mnist) -> None:
    images = fashion_mnist.test.images[:3]
    np.testing.assert_array_equal(
        detector.score(images.reshape(3, 28, 28)).scores, detector.score(images).scores
    )
    assert len(detector.score(np.zeros((0, 784), np.uint8))) == 0


def test_version_and_threshold_come_from_the_bundle(detector: Detector, trained_bundle) -> None:
    bundle = load_bundle(trained_bundle)
    assert detector.version == bundle.version
    assert detector.threshold == bundle.calibration.threshold


@pytest.mark.parametrize(
    "array", [np.zeros((2, 784), np.float32), np.zeros((2, 783), np.uint8), np.zeros(784, np.uint8)]
)
def test_bad_batches_are_rejected(array: np.ndarray) -> None:
    with pytest.raises(ValueError):
        as_image_batch(array)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DeviceError, match="unknown"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")


def test_cpu_submit_is_done_at_once(detector: Detector, fashion_mnist) -> None:
    pending = detector.submit(fashion_mnist.test.images[:10])
    assert pending.done()
    assert len(pending.result()) == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_match_cpu_through_pinned_buffers(
    detector: Detector, trained_bundle: Path, fashion_mnist
) -> None:
    """The pinned, non-blocking path: several batches in flight, split across both pinned slots,
    give the CPU's scores; `done()` turns true without `result()` being called."""
    images = fashion_mnist.test.images[:500]
    bundle = load_bundle(trained_bundle)  # its own model: Detector moves it to the device
    on_gpu = Detector(
        bundle.model, bundle.calibration, version="v", device="cuda", max_batch_size=128
    )
    pending = [on_gpu.submit(images[i : i + 200]) for i in range(0, 500, 200)]
    torch.cuda.synchronize()
    assert all(p.done() for p in pending)
    gpu = np.concatenate([p.result().scores for p in pending])
    cpu = detector.score(images).scores
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-2)
