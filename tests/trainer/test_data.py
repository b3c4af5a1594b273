"""Data loaders: IDX (gzip or plain), npz, image files and folders of them to score, the normal
split, and clear errors. The folder data set (folder:DIR): tests/trainer/test_image_folder.py."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.preprocess import LEGACY_PREPROCESSING, ImageDecoding, Preprocessing
from trainer import data as data_module
from trainer.config import DataConfig
from trainer.data import (
    DataError,
    ImageSet,
    load_images,
    read_idx,
    read_image_file,
    split_normal,
)

DEFAULT = ImageDecoding(Preprocessing())
LEGACY = ImageDecoding(LEGACY_PREPROCESSING)


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">i", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def write_idx_folder(folder: Path, *, gz: bool, n_train: int = 20, n_test: int = 10) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write = (
        (lambda p, b: p.write_bytes(gzip.compress(b))) if gz else (lambda p, b: p.write_bytes(b))
    )
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write(folder / f"{stem}-images-idx3-ubyte{suffix}", idx_bytes(_images(n, seed=n)))
        write(folder / f"{stem}-labels-idx1-ubyte{suffix}", idx_bytes(np.arange(n) % 3))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder(tmp_path: Path, gz: bool) -> None:
    write_idx_folder(tmp_path, gz=gz)
    config = DataConfig(dataset=f"idx:{tmp_path}")
    train = load_images(config, split="train")
    test = load_images(config, split="test")
    assert train.images.shape == (20, 784) and train.images.dtype == np.uint8
    assert test.images.shape == (10, 784)
    np.testing.assert_array_equal(train.images, _images(20, seed=20).reshape(20, 784))
    assert train.labels.dtype == np.int64
    np.testing.assert_array_equal(test.labels, np.arange(10) % 3)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    good = idx_bytes(_images(2))
    cases = {
        "magic": b"\x01" + good[1:],
        "type": good[:2] + b"\x0d" + good[3:],
        "truncated": good[:-5],
        "header": good[:6],
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError):
            read_idx(path)


def test_idx_label_count_must_match(tmp_path: Path) -> None:
    write_idx_folder(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(5)))
    with pytest.raises(DataError, match="5 labels for 20 images"):
        load_images(DataConfig(dataset=f"idx:{tmp_path}"), split="train")


def test_npz_with_splits_and_with_one_array(tmp_path: Path) -> None:
    split_file = tmp_path / "split.npz"
    np.savez(split_file, x_train=_images(6), y_train=np.arange(6), x_test=_images(4, 1))
    config = DataConfig(dataset=f"npz:{split_file}")
    assert len(load_images(config, split="train")) == 6
    test = load_images(config, split="test")
    assert len(test) == 4 and test.labels is None

    flat = tmp_path / "flat.npz"
    np.savez(flat, x=_images(5).reshape(5, 784), y=np.arange(5))
    loaded = load_images(DataConfig(dataset=f"npz:{flat}"), split="test")
    assert loaded.images.shape == (5, 784)
    np.testing.assert_array_equal(loaded.labels, np.arange(5))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((3, 28, 28), np.float32)}, "uint8"),
        ({"x": np.zeros((3, 27, 27), np.uint8)}, "N x 28 x 28"),
        ({"images": np.zeros((3, 784), np.uint8)}, "needs an array 'x'"),
        ({"x": np.zeros((3, 784), np.uint8), "y": np.arange(4)}, "labels must be 3"),
    ],
)
def test_bad_npz(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_images(DataConfig(dataset=f"npz:{path}"), split="train")


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_images(DataConfig(dataset=f"npz:{tmp_path / 'none.npz'}"), split="train")
    with pytest.raises(DataError, match="not a directory"):
        load_images(DataConfig(dataset=f"idx:{tmp_path / 'none'}"), split="train")
    with pytest.raises(DataError, match="no train images"):
        load_images(DataConfig(dataset=f"idx:{tmp_path}"), split="train")


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data_module, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    config = DataConfig(dataset="fashion-mnist", root=str(tmp_path), download=False)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as info:
        load_images(config, split="train")
    assert "\n" not in str(info.value)


def test_torchvision_root_is_read_first(tmp_path: Path) -> None:
    write_idx_folder(tmp_path / "MNIST" / "raw", gz=False)
    config = DataConfig(dataset="mnist", root=str(tmp_path), download=False)
    assert len(load_images(config, split="train")) == 20


def test_real_fashion_mnist(fashion_mnist) -> None:
    assert fashion_mnist.train.images.shape == (60000, 784)
    assert fashion_mnist.test.images.shape == (10000, 784)
    assert np.bincount(fashion_mnist.test.labels).tolist() == [1000] * 10


def test_split_normal_is_seeded_disjoint_and_one_class() -> None:
    images = np.arange(100, dtype=np.uint8).repeat(784).reshape(100, 784)
    labels = np.arange(100) % 4
    config = DataConfig(dataset="fashion-mnist", normal_classes=(1, 2), val_fraction=0.2)
    a = split_normal(ImageSet(images, labels), config, seed=3)
    b = split_normal(ImageSet(images, labels), config, seed=3)
    c = split_normal(ImageSet(images, labels), config, seed=4)
    assert len(a.train) == 40 and len(a.val) == 10
    np.testing.assert_array_equal(a.val, b.val)
    assert not np.array_equal(a.val, c.val)
    train_ids, val_ids = set(a.train[:, 0]), set(a.val[:, 0])
    assert not train_ids & val_ids
    assert {i % 4 for i in train_ids | val_ids} == {1, 2}


def test_split_normal_needs_normal_images() -> None:
    images = np.zeros((10, 784), np.uint8)
    config = DataConfig(dataset="fashion-mnist", normal_classes=(7,))
    with pytest.raises(DataError, match="too few"):
        split_normal(ImageSet(images, np.zeros(10, np.int64)), config, seed=0)


# --- inputs of `vaewatch score` -----------------------------------------------------------------


def test_read_npy_npz_and_idx(tmp_path: Path) -> None:
    images = _images(4)
    np.save(tmp_path / "a.npy", images)
    np.savez(tmp_path / "a.npz", x=images)
    (tmp_path / "a-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    for name in ("a.npy", "a.npz", "a-images-idx3-ubyte.gz"):
        np.testing.assert_array_equal(
            read_image_file(tmp_path / name).images, images.reshape(4, 784)
        )


@pytest.mark.parametrize("decoding", [DEFAULT, LEGACY], ids=["default", "legacy"])
def test_read_an_image_folder_at_any_depth_and_single_files(
    tmp_path: Path, decoding: ImageDecoding
) -> None:
    images = _images(3)
    for i, picture in enumerate(images):
        Image.fromarray(picture).save(tmp_path / f"img{i}.png")
    (tmp_path / "deeper").mkdir()
    Image.fromarray(images[0]).convert("RGB").save(tmp_path / "deeper" / "rgb.bmp")
    (tmp_path / "notes.txt").write_text("ignored")
    loaded = read_image_file(tmp_path, decoding=decoding)
    assert loaded.names == ["deeper/rgb.bmp", "img0.png", "img1.png", "img2.png"]
    np.testing.assert_array_equal(loaded.images[1:], images.reshape(3, 784))
    np.testing.assert_array_equal(loaded.images[0], images[0].ravel())
    one = read_image_file(tmp_path / "img1.png", decoding=decoding)
    assert one.names == [str(tmp_path / "img1.png")]
    np.testing.assert_array_equal(one.images, images[1:2].reshape(1, 784))


def test_an_unreadable_file_in_a_folder_is_one_line_and_the_rest_are_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = _images(2)
    for i, picture in enumerate(images):
        Image.fromarray(picture).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    with caplog.at_level(logging.WARNING):
        loaded = read_image_file(tmp_path, decoding=DEFAULT)
    assert loaded.names == ["img0.png", "img1.png"]
    (line,) = [r.getMessage() for r in caplog.records if "broken.jpg" in r.getMessage()]
    assert "corrupt_image" in line and "\n" not in line


def test_bad_score_inputs(tmp_path: Path) -> None:
    np.save(tmp_path / "float.npy", np.zeros((2, 784), np.float64))
    np.save(tmp_path / "shape.npy", np.zeros((2, 100), np.uint8))
    (tmp_path / "x.csv").write_text("1,2,3")
    (tmp_path / "empty").mkdir()
    (tmp_path / "big").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "big" / "a.png")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    (tmp_path / "broken" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "alone.webp").write_bytes(b"RIFF")
    cases = {
        "float.npy": "uint8",
        "shape.npy": "N x 784",
        "x.csv": "unknown input format",
        "empty": "no image files",
        "big": "none of its 1 image files could be read",  # not 28x28: the legacy bundle's rule
        "broken": "none of its 2 image files could be read",
        "alone.webp": "alone.webp: not_an_image: not a PNG, JPEG",
        "absent.npy": "no such file",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message):
            read_image_file(tmp_path / name, decoding=LEGACY)
