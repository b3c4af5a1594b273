"""`data.dataset=folder:DIR`: a folder of image files as a data set, the way torchvision's
ImageFolder and anomalib's Folder read one.

Layout: one subfolder per class, named by its label (`DIR/tshirt/001.jpg`, files at any depth
below it), or a flat folder of files, which are all normal (unlabelled). The test split is
`DIR/test/` when there is one (the training split is then `DIR/train/`, or the rest of DIR);
otherwise `data.test_fraction` of the files, chosen by a hash of each file's path, so the same
files are held out on every run and adding a file moves no other. Class folders named by
numbers (`0/`, `7/`) give those labels; other names are labelled in sorted order, and
`data.normal_classes` names them (`[good]`).

Files are decoded by the bundle's preprocessing (detector.preprocess) in threads, with a
progress bar on a terminal. A file that cannot be read gets one log line and is counted; only a
folder where every file fails is an error.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from detector.preprocess import (
    IMAGE_SUFFIXES,
    ImageDecoding,
    ImageSettings,
    Preprocessing,
    preprocess_images,
)

log = logging.getLogger(__name__)

PREFIX = "folder:"
_BLOCK = 512  # files decoded per step of the progress bar
_INVERT_SAMPLE = 256  # files whose borders decide `images.invert: auto`


class FolderError(Exception):
    """The folder holds no usable images. One line (trainer.data raises it as a DataError)."""


@dataclass(frozen=True)
class FolderFiles:
    """The image files of one split, their labels (None for a flat folder) and the class names
    by label."""

    root: Path
    files: list[Path]
    labels: np.ndarray | None
    classes: dict[int, str] | None
    skipped: int  # files that are not images by their name (notes.txt, .DS_Store)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _image_files(folder: Path) -> tuple[list[Path], int]:
    files, skipped = [], 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(
            part.startswith(".") for part in path.relative_to(folder).parts
        ):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
        else:
            skipped += 1
    return files, skipped


def every_file(folder: Path) -> FolderFiles:
    """Every image file under `folder`, at any depth, unlabelled (`vaewatch score DIR`)."""
    files, skipped = _image_files(folder)
    return FolderFiles(folder, files, None, None, skipped)


def _class_folders(folder: Path, exclude: Sequence[str] = ()) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and _visible(p) and p.name not in exclude
    )


def _split_roots(root: Path) -> tuple[Path, Path | None, tuple[str, ...]]:
    """(training root, test root or None, subfolders of the training root that are no class)."""
    test = root / "test"
    if not test.is_dir():
        return root, None, ()
    train = root / "train"
    if train.is_dir():
        return train, test, ()
    return root, test, ("test",)


def class_labels(names: Sequence[str]) -> dict[str, int]:
    """Class folder name -> label: numbers stand for themselves, other names count in order."""
    if names and all(name.isdecimal() for name in names):
        return {name: int(name) for name in names}
    return {name: i for i, name in enumerate(sorted(set(names)))}


def list_files(
    folder: Path, *, exclude: Sequence[str] = (), labels: dict[str, int] | None = None
) -> FolderFiles:
    """The image files under `folder` with their labels: one class per subfolder, or none for a
    flat folder (loose files beside class folders are left out, with a warning)."""
    classes = _class_folders(folder, exclude)
    if not classes:
        return every_file(folder)
    labels = labels or class_labels([c.name for c in classes])
    loose = [p for p in folder.iterdir() if p.is_file() and _visible(p)]
    if loose:
        log.warning(
            "%s: %d files beside the class folders are left out (a class is a subfolder)",
            folder, len(loose),
        )  # fmt: skip
    files: list[Path] = []
    file_labels: list[int] = []
    skipped = 0
    for folder_of_class in classes:
        found, not_images = _image_files(folder_of_class)
        files += found
        file_labels += [labels[folder_of_class.name]] * len(found)
        skipped += not_images
    names = {label: name for name, label in labels.items()}
    return FolderFiles(folder, files, np.asarray(file_labels, dtype=np.int64), names, skipped)


def _held_out(root: Path, files: Sequence[Path], fraction: float) -> np.ndarray:
    """Whether each file is in the test split: its path's hash below `fraction`."""
    draws = [
        int.from_bytes(hashlib.blake2b(f.relative_to(root).as_posix().encode(), digest_size=8)
                       .digest(), "big") / 2**64
        for f in files
    ]  # fmt: skip
    return np.asarray(draws, dtype=np.float64) < fraction


def split_files(root: Path, split: str, *, test_fraction: float) -> FolderFiles:
    """The files of `split` ("train" or "test") of the folder data set at `root`."""
    if not root.is_dir():
        raise FolderError(f"{PREFIX}{root}: not a folder")
    train_root, test_root, exclude = _split_roots(root)
    names = [c.name for c in _class_folders(train_root, exclude)]
    if test_root is not None:
        names += [c.name for c in _class_folders(test_root)]
    labels = class_labels(names) if names else None
    if test_root is not None:
        return list_files(
            test_root if split == "test" else train_root,
            exclude=() if split == "test" else exclude,
            labels=labels,
        )
    every = list_files(root, labels=labels)
    keep = _held_out(root, every.files, test_fraction)
    if split == "train":
        keep = ~keep
    return FolderFiles(
        root,
        [f for f, k in zip(every.files, keep, strict=True) if k],
        every.labels[keep] if every.labels is not None else None,
        every.classes,
        every.skipped,
    )


def decode_files(
    listing: FolderFiles, decoding: ImageDecoding, *, what: str
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(images N x 784, labels or None, names) of the files that decode; one warning line per
    file that does not; FolderError when none does."""
    files = listing.files
    if not files:
        raise FolderError(
            f"{listing.root}: no image files ({', '.join(IMAGE_SUFFIXES)}) for {what}"
        )
    chunks, valid = [], np.zeros(len(files), dtype=bool)
    failed = 0
    first_failure = ""
    with tqdm(total=len(files), desc=f"reading {what}", unit="img", disable=None) as bar:
        for start in range(0, len(files), _BLOCK):
            block = files[start : start + _BLOCK]
            done = preprocess_images(block, decoding)
            for i, (reason, message) in sorted(done.errors.items()):
                log.warning("%s: unreadable (%s): %s", block[i], reason, message)
                first_failure = first_failure or f"{block[i].name}: {reason}: {message}"
            failed += len(done.errors)
            chunks.append(done.images)
            valid[start : start + len(block)] = done.valid
            bar.update(len(block))
    if failed == len(files):
        raise FolderError(
            f"{listing.root}: none of its {len(files)} image files could be read (the first: "
            f"{first_failure})"
        )
    names = [
        f.relative_to(listing.root).as_posix() for f, ok in zip(files, valid, strict=True) if ok
    ]
    log.info(
        "%s: %d images read from %s%s%s", what, int(valid.sum()), listing.root,
        f", {failed} unreadable (one line each above)" if failed else "",
        f", {listing.skipped} other file{'s' if listing.skipped > 1 else ''} skipped (not an "
        "image by its name)" if listing.skipped else "",
    )  # fmt: skip
    labels = listing.labels[valid] if listing.labels is not None else None
    return np.concatenate(chunks), labels, names


def decide_invert(root: Path, settings: ImageSettings, *, test_fraction: float) -> bool:
    """`images.invert: auto` for a folder: True when the median border pixel of up to 256 of its
    training images (squeezed to 28 x 28, not inverted) is over 127, so that the background the
    model sees is dark."""
    files = split_files(root, "train", test_fraction=test_fraction).files
    if len(files) > _INVERT_SAMPLE:
        files = [files[i] for i in np.linspace(0, len(files) - 1, _INVERT_SAMPLE).astype(int)]
    probe = settings.preprocessing(invert=False).model_copy(update={"aspect": "stretch"})
    done = preprocess_images(files, settings.decoding(probe))
    if not len(done.images):
        return False
    square = done.images.reshape(-1, 28, 28)
    border = np.concatenate(
        [square[:, 0], square[:, -1], square[:, 1:-1, 0], square[:, 1:-1, -1]], axis=1
    )
    median = float(np.median(border))
    invert = median > 127
    log.info(
        "images.invert auto: the median border pixel of %d images is %.0f, so %s",
        len(done.images), median, "inverted (light background)" if invert else "not inverted",
    )  # fmt: skip
    return invert


def folder_preprocessing(
    root: Path, settings: ImageSettings, *, test_fraction: float
) -> Preprocessing:
    """The preprocessing `vaewatch train` records for a folder: the settings, `invert` decided."""
    invert = settings.invert
    if invert == "auto":
        invert = decide_invert(root, settings, test_fraction=test_fraction)
    return settings.preprocessing(invert=bool(invert))
