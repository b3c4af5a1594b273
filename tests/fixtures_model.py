"""Fixtures that give real Fashion-MNIST and a small trained bundle (owned by the trainer work).

`fashion_mnist` needs the real data set (Debian package `dataset-fashion-mnist`, installed by
.ci/run, or a torchvision root); without it the tests that use it are skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.config import DetectorSettings, ModelConfig
from trainer.config import CalibrationConfig, DataConfig, TrainConfig
from trainer.data import DataError, ImageSet, load_images

__all__ = [
    "CPU",
    "SMALL_BUNDLE_NORMAL_CLASS",
    "FashionMNIST",
    "fashion_mnist",
    "one_torch_thread",
    "small_bundle_settings",
    "trained_bundle",
]

SMALL_BUNDLE_NORMAL_CLASS = 0
# The tests score on the CPU whatever the machine has, in `auto` precision (bf16 on a CPU with
# native bf16 for a bundle that validated it); CPU_FP32 where a test compares with fp32 scores.
CPU = DetectorSettings(device="cpu")
CPU_FP32 = DetectorSettings(device="cpu", precision="fp32")


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread for a while. Small models gain nothing from a second thread, and
    on a 2-core machine shared with a broker, a worker or another test run, two spinning OpenMP
    threads made the small bundle's training many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class FashionMNIST:
    train: ImageSet
    test: ImageSet


@pytest.fixture(scope="session")
def fashion_mnist() -> FashionMNIST:
    """The real Fashion-MNIST train (60,000) and test (10,000) images with labels."""
    config = DataConfig(dataset="fashion-mnist", download=False)
    try:
        return FashionMNIST(load_images(config, split="train"), load_images(config, split="test"))
    except DataError as exc:
        pytest.skip(f"real Fashion-MNIST not available: {exc}")


def small_bundle_settings(npz: Path) -> dict:
    """Configs of the small test bundle: MLP, Gaussian learned sigma, 8 epochs on 3,000 images."""
    return {
        "data": DataConfig(dataset=f"npz:{npz}", normal_classes=(SMALL_BUNDLE_NORMAL_CLASS,)),
        "model": ModelConfig(kind="mlp", mlp_hidden=(256,), latent_dim=16),
        "train": TrainConfig(epochs=8, batch_size=64, progress=False, device="cpu"),
        "calibration": CalibrationConfig(target_fpr=0.01),
    }


@pytest.fixture(scope="session")
def trained_bundle(fashion_mnist: FashionMNIST, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle trained on 3,000 real T-shirt/top (class 0) training images, with 300 held out for
    calibration; takes a few seconds on 2 CPU cores. Its test split is the real test set."""
    from trainer.fit import train_bundle

    folder = tmp_path_factory.mktemp("bundle")
    train = fashion_mnist.train
    rng = np.random.default_rng(0)
    normal = np.flatnonzero(train.labels == SMALL_BUNDLE_NORMAL_CLASS)
    others = np.flatnonzero(train.labels != SMALL_BUNDLE_NORMAL_CLASS)
    pick = np.concatenate(
        [rng.choice(normal, 3000, replace=False), rng.choice(others, 500, replace=False)]
    )
    npz = folder / "slice.npz"
    np.savez(
        npz,
        x_train=train.images[pick],
        y_train=train.labels[pick],
        x_test=fashion_mnist.test.images,
        y_test=fashion_mnist.test.labels,
    )
    out = folder / "model"
    with one_torch_thread():
        train_bundle(out=out, **small_bundle_settings(npz))
    return out
