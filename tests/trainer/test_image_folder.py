"""The folder data set (data.dataset=folder:DIR, trainer/image_folder.py): its layouts, splits
and labels, files of any format and size, unreadable files, and `images.invert: auto`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.preprocess import ImageDecoding, ImageSettings, Preprocessing
from trainer.config import DataConfig
from trainer.data import (
    DataError,
    load_images,
    normal_labels,
    normal_mask,
    split_normal,
    training_preprocessing,
)

DECODING = ImageDecoding(Preprocessing(), threads=2)
# Files of every format, size and mode a user's folder may hold, each a different shade.
KINDS = [
    ("png", "L", (28, 28)),
    ("jpg", "RGB", (640, 480)),
    ("bmp", "RGB", (50, 70)),
    ("tiff", "I;16", (64, 64)),
    ("webp", "RGBA", (33, 33)),
    ("png", "P", (100, 20)),
]


def write_image(
    path: Path, shade: int, *, mode: str = "L", size: tuple[int, int] = (28, 28)
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(shade)
    pixels = np.clip(rng.normal(shade, 10, (size[1], size[0])), 0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels)
    if mode == "I;16":
        picture = Image.fromarray(pixels.astype(np.uint16) * 257)
    elif mode != "L":
        picture = picture.convert(mode)
    picture.save(path)


def write_classes(root: Path, counts: dict[str, int], *, start: int = 0) -> None:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            suffix, mode, size = KINDS[i % len(KINDS)]
            path = root / name / f"{start + i:03d}.{suffix}"
            write_image(path, 20 + 40 * c, mode=mode, size=size)


def folder(root: Path, **update: object) -> DataConfig:
    return DataConfig(dataset=f"folder:{root}", **update)


def test_a_test_subfolder_is_the_test_split_and_names_are_labels(tmp_path: Path) -> None:
    write_classes(tmp_path / "train", {"good": 6})
    write_classes(tmp_path / "test", {"crack": 3, "good": 4})
    config = folder(tmp_path, normal_classes=("good",))
    train = load_images(config, split="train", decoding=DECODING)
    test = load_images(config, split="test", decoding=DECODING)
    assert train.classes == test.classes == {0: "crack", 1: "good"}  # both splits' names, sorted
    assert train.labels.tolist() == [1] * 6
    assert sorted(test.labels.tolist()) == [0] * 3 + [1] * 4
    assert train.images.shape == (6, 784) and train.names[0] == "good/000.png"
    assert normal_mask(test, config.normal_classes).sum() == 4


def test_without_a_train_subfolder_the_rest_of_the_folder_trains(tmp_path: Path) -> None:
    write_classes(tmp_path, {"a": 3, "b": 3})
    write_classes(tmp_path / "test", {"a": 2, "b": 2})
    train = load_images(folder(tmp_path), split="train", decoding=DECODING)
    assert len(train) == 6 and train.classes == {0: "a", 1: "b"}
    assert len(load_images(folder(tmp_path), split="test", decoding=DECODING)) == 4


def test_without_a_test_subfolder_a_fraction_is_held_out_by_path(tmp_path: Path) -> None:
    write_classes(tmp_path, {"0": 40, "7": 40})  # numbered classes keep their numbers
    config = folder(tmp_path, test_fraction=0.25)
    train = load_images(config, split="train", decoding=DECODING)
    test = load_images(config, split="test", decoding=DECODING)
    assert not set(train.names) & set(test.names) and len(train) + len(test) == 80
    assert 10 <= len(test) <= 30
    assert set(test.labels.tolist()) == {0, 7} and test.classes == {0: "0", 7: "7"}
    # A new file moves no other file between the splits.
    write_image(tmp_path / "7" / "new.png", 5)
    again = load_images(config, split="test", decoding=DECODING)
    assert set(test.names) <= set(again.names)
    assert normal_labels((7,), train.classes) == (7,)


def test_a_flat_folder_is_all_normal_and_unlabelled(tmp_path: Path) -> None:
    for i in range(12):
        write_image(tmp_path / f"{i}.png", 100 + i)
    config = folder(tmp_path, test_fraction=0.3)
    train = load_images(config, split="train", decoding=DECODING)
    assert train.labels is None and train.classes is None
    split = split_normal(train, config.model_copy(update={"val_fraction": 0.2}), seed=0)
    assert len(split.train) + len(split.val) == len(train)


def test_normal_classes_must_name_a_named_folders_classes(tmp_path: Path) -> None:
    write_classes(tmp_path, {"sneaker": 4, "tshirt": 4})
    train = load_images(folder(tmp_path), split="train", decoding=DECODING)
    with pytest.raises(DataError, match=r"0 is not one of the folder's classes \(sneaker, tsh"):
        normal_mask(train, (0,))
    with pytest.raises(DataError, match="'boot' is not one of"):
        normal_mask(train, ("boot",))
    assert normal_labels(("tshirt",), train.classes) == (1,)
    with pytest.raises(DataError, match="'tshirt' is a name"):
        normal_labels(("tshirt",), None)


def test_every_format_size_and_mode_is_read(tmp_path: Path) -> None:
    write_classes(tmp_path, {"all": len(KINDS) * 2})
    train = load_images(folder(tmp_path, test_fraction=0.01), split="train", decoding=DECODING)
    test = load_images(folder(tmp_path, test_fraction=0.99), split="test", decoding=DECODING)
    names = set(train.names) | set(test.names)
    assert {Path(n).suffix for n in names} == {f".{k[0]}" for k in KINDS}
    assert len(names) == len(KINDS) * 2


def test_unreadable_files_are_one_line_each_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_classes(tmp_path / "train", {"good": 4})
    write_classes(tmp_path / "test", {"good": 2})
    (tmp_path / "train" / "good" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    (tmp_path / "train" / "good" / "zz-empty.jpg").write_bytes(b"")
    (tmp_path / "train" / "good" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.INFO):
        train = load_images(folder(tmp_path), split="train", decoding=DECODING)
    assert len(train) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(": unreadable (" in line for line in warnings)
    lines = [r.getMessage() for r in caplog.records]
    assert any("2 unreadable" in line and "1 other file skipped" in line for line in lines)


def test_a_folder_whose_every_file_fails_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "good").mkdir()
    for i in range(3):
        (tmp_path / "good" / f"{i}.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="none of its 3 image files could be read"):
        load_images(folder(tmp_path, test_fraction=0.01), split="train", decoding=DECODING)
    with pytest.raises(DataError, match="not a folder"):
        load_images(folder(tmp_path / "absent"), split="train", decoding=DECODING)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_images(folder(tmp_path / "empty"), split="train", decoding=DECODING)


def test_invert_auto_is_decided_from_the_folders_borders(tmp_path: Path) -> None:
    (tmp_path / "scans").mkdir()
    for i in range(8):
        page = np.full((40, 60), 240, np.uint8)
        page[15:25, 20 + i : 40] = 30  # dark ink on a light page
        Image.fromarray(page).save(tmp_path / "scans" / f"{i}.png")
        write_image(tmp_path / "dark" / f"{i}.png", 10)
    settings = ImageSettings()
    scans = training_preprocessing(folder(tmp_path / "scans"), settings)
    dark = training_preprocessing(folder(tmp_path / "dark"), settings)
    assert scans.invert is True and dark.invert is False
    kept = training_preprocessing(folder(tmp_path / "scans"), ImageSettings(invert=False))
    assert kept.invert is False
    assert training_preprocessing(DataConfig(), settings).invert is False  # arrays: never
    config = folder(tmp_path / "scans", test_fraction=0.01)
    inverted = load_images(config, split="train", decoding=settings.decoding(scans))
    assert np.median(inverted.images) <= 15 and inverted.images.max() >= 200  # light ink, dark page
