"""Real MNIST-like images as uint8 arrays: dataset loading, the normal/validation split, and the
files `vaewatch score` reads.

Image files (a `folder:DIR` data set, a folder or files given to `vaewatch score`) become arrays
through a bundle's preprocessing (detector.preprocess), passed in as `decoding`; the folder data
set's layout and splits are trainer/image_folder.py's.

Every loader returns `ImageSet`: `images` uint8 N x 784 (row-major 28 x 28) and `labels` int64 N
or None. Pixels stay uint8 until they reach the device, where they become floats in [0, 1]; that
keeps the training set 4x smaller in memory and makes the conversion happen once per batch on the
device rather than per image in a Python transform pipeline.

There are no synthetic stand-ins: missing data is a `DataError` whose message says how to get it.
"""

from __future__ import annotations

import gzip
import logging
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.config import IMAGE_PIXELS, IMAGE_SIDE
from detector.preprocess import (
    IMAGE_SUFFIXES,
    ImageDecoding,
    ImageError,
    ImageSettings,
    Preprocessing,
    preprocess_image,
)
from trainer import image_folder
from trainer.config import DataConfig

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test")
# File stems of the IDX files per split, as published (train-*, t10k-*); `test-*` also accepted.
_IDX_STEMS = {"train": ("train",), "test": ("t10k", "test")}
# torchvision keeps raw IDX files under ROOT/<class name>/raw.
_TORCHVISION_FOLDERS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_HOW_TO_GET = {
    "fashion-mnist": (
        "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set "
        "data.download=true on a machine with internet access"
    ),
    "mnist": (
        "set data.download=true on a machine with internet access, or use data.dataset=idx:DIR"
    ),
}
_IDX_UBYTE = 0x08


class DataError(Exception):
    """Images are missing or malformed. The message is one line and says what to do."""


@dataclass(frozen=True)
class ImageSet:
    """uint8 images N x 784 with optional int64 labels N, optional names (e.g. image files) and,
    for a folder, the class name of each label."""

    images: np.ndarray
    labels: np.ndarray | None = None
    names: list[str] | None = None
    classes: dict[int, str] | None = None

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class NormalSplit:
    """Normal training images split into the part the model fits and the held-out part used for
    early stopping and threshold calibration (never seen by the optimiser)."""

    train: np.ndarray
    val: np.ndarray


# --- IDX files ----------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (plain or gzip) of unsigned bytes into an array of its stated shape.

    Format (LeCun's MNIST page): 2 zero bytes, a type code (0x08 = unsigned byte), the number of
    dimensions, one big-endian int32 per dimension, then the data in row-major order. The data
    is read straight into an array of the stated size, so a gzip that expands far beyond its
    header (a decompression bomb) stops at that size.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            zipped = file.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if zipped else path.open("rb") as stream:
            return _read_idx_stream(stream, path)
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, truncated or corrupt gzip
        raise DataError(f"{path}: cannot read IDX file ({_first_line(exc)})") from None


def _read_idx_stream(stream: Any, path: Path) -> np.ndarray:
    head = stream.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if head[2] != _IDX_UBYTE:
        raise DataError(f"{path}: IDX type code 0x{head[2]:02x} is not unsigned byte (0x08)")
    ndim = head[3]
    dims = stream.read(4 * ndim)
    if ndim == 0 or len(dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">i4"))
    if min(shape) < 0:
        raise DataError(f"{path}: IDX header has a negative dimension {shape}")
    size = math.prod(shape)
    try:
        data = np.empty(size, dtype=np.uint8)
    except (MemoryError, ValueError):
        raise DataError(f"{path}: IDX header says {shape} ({size} bytes): too large") from None
    filled = stream.readinto(memoryview(data)) if size else 0
    if filled != size or stream.read(1):
        found = f"{filled}" if filled != size else "more"
        raise DataError(f"{path}: IDX header says {shape} ({size} bytes), file has {found}")
    return data.reshape(shape)


def _find_idx(folder: Path, split: str, kind: str) -> Path | None:
    """The IDX file of `kind` (images/labels) for `split` in `folder`, gzip or not."""
    suffix = "idx3-ubyte" if kind == "images" else "idx1-ubyte"
    for stem in _IDX_STEMS[split]:
        for name in (f"{stem}-{kind}-{suffix}", f"{stem}-{kind}.{suffix}"):
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    return None


def _load_idx_folder(folder: Path, split: str) -> ImageSet | None:
    images_file = _find_idx(folder, split, "images")
    if images_file is None:
        return None
    images = as_uint8_images(read_idx(images_file), source=str(images_file))
    labels_file = _find_idx(folder, split, "labels")
    labels = None
    if labels_file is not None:
        labels = read_idx(labels_file).astype(np.int64).ravel()
        if len(labels) != len(images):
            raise DataError(
                f"{labels_file}: {len(labels)} labels for {len(images)} images in {images_file}"
            )
    log.info("loaded %d %s images from %s", len(images), split, images_file)
    return ImageSet(images, labels)


# --- arrays -------------------------------------------------------------------------------------


def as_uint8_images(array: np.ndarray, *, source: str) -> np.ndarray:
    """Check dtype and shape (N x 28 x 28, N x 1 x 28 x 28 or N x 784) and flatten to N x 784."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise DataError(
            f"{source}: images must be uint8 0..255, got {array.dtype} "
            "(convert floats in [0, 1] with (x * 255).round().astype(np.uint8))"
        )
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 3 and array.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE):
        array = array.reshape(len(array), IMAGE_PIXELS)
    if array.ndim == 2 and array.shape[0] == IMAGE_SIDE and array.shape[1] == IMAGE_SIDE:
        array = array.reshape(1, IMAGE_PIXELS)  # one image
    if array.ndim != 2 or array.shape[1] != IMAGE_PIXELS:
        raise DataError(
            f"{source}: images must be N x 28 x 28 or N x 784, got shape {tuple(array.shape)}"
        )
    return np.ascontiguousarray(array)


def _labels(array: np.ndarray, n: int, *, source: str) -> np.ndarray:
    labels = np.asarray(array)
    if labels.ndim != 1 or len(labels) != n or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: labels must be {n} integers, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def _load_npz(path: Path, split: str) -> ImageSet:
    """npz with `x` (and optional `y`) for both splits, or `x_train`/`x_test` (+ `y_*`)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file (data.dataset=npz:FILE needs an existing .npz)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            contents = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: not a readable .npz file ({_first_line(exc)})") from None
    except MemoryError:
        raise DataError(f"{path}: its arrays do not fit in memory") from None
    x_key, y_key = f"x_{split}", f"y_{split}"
    if x_key not in contents:
        if "x" not in contents:
            raise DataError(
                f"{path}: needs an array 'x' (or 'x_train'/'x_test'); has {list(contents)}"
            )
        if split == "test":
            log.warning("%s has no x_test: evaluating on the same images as training", path)
        x_key, y_key = "x", "y"
    images = as_uint8_images(contents[x_key], source=f"{path}[{x_key}]")
    labels = (
        _labels(contents[y_key], len(images), source=f"{path}[{y_key}]")
        if y_key in contents
        else None
    )
    return ImageSet(images, labels)


# --- datasets -----------------------------------------------------------------------------------


def _torchvision_download(name: str, root: Path, split: str) -> ImageSet:
    from torchvision import datasets  # imported here: only the download path needs it

    cls = datasets.FashionMNIST if name == "fashion-mnist" else datasets.MNIST
    try:
        dataset = cls(str(root), train=split == "train", download=True)
    except Exception as exc:  # network, HTTP, disk: all mean "could not download"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{name}: not found locally and the download failed ({reason}); {_HOW_TO_GET[name]}"
        ) from None
    images = dataset.data.numpy().astype(np.uint8).reshape(-1, IMAGE_PIXELS)
    return ImageSet(np.ascontiguousarray(images), dataset.targets.numpy().astype(np.int64))


def _load_named(name: str, config: DataConfig, split: str) -> ImageSet:
    root = Path(config.root)
    folders = [root / _TORCHVISION_FOLDERS[name] / "raw"]
    if name == "fashion-mnist":
        folders.append(DEBIAN_FASHION_MNIST)
    for folder in folders:
        found = _load_idx_folder(folder, split) if folder.is_dir() else None
        if found is not None:
            return found
    if config.download:
        log.info("%s not found in %s; downloading with torchvision", name, folders)
        return _torchvision_download(name, root, split)
    looked = ", ".join(str(f) for f in folders)
    raise DataError(f"{name} {split} images not found (looked in {looked}); {_HOW_TO_GET[name]}")


def _load_folder(config: DataConfig, split: str, decoding: ImageDecoding | None) -> ImageSet:
    if decoding is None:  # a caller's bug, not the user's: every caller has a preprocessing
        raise ValueError("a folder data set needs the preprocessing of its images (decoding=)")
    root = Path(config.dataset[len(image_folder.PREFIX) :])
    try:
        listing = image_folder.split_files(root, split, test_fraction=config.test_fraction)
        images, labels, names = image_folder.decode_files(
            listing, decoding, what=f"{split} split of {config.dataset}"
        )
    except image_folder.FolderError as exc:
        raise DataError(str(exc)) from None
    return ImageSet(images, labels, names, listing.classes)


def training_preprocessing(config: DataConfig, settings: ImageSettings) -> Preprocessing:
    """The preprocessing a bundle trained on `config.dataset` records: the settings' own, with
    `invert: auto` decided from a folder's images (arrays are the model's input already, never
    inverted)."""
    if config.dataset.startswith(image_folder.PREFIX):
        root = Path(config.dataset[len(image_folder.PREFIX) :])
        try:
            return image_folder.folder_preprocessing(
                root, settings, test_fraction=config.test_fraction
            )
        except image_folder.FolderError as exc:
            raise DataError(str(exc)) from None
    return settings.preprocessing(invert=settings.invert is True)


def load_images(
    config: DataConfig, *, split: str, decoding: ImageDecoding | None = None
) -> ImageSet:
    """The `split` ("train" or "test") of `config.dataset` as uint8 N x 784 (+ labels); image
    files (folder:DIR) through `decoding`, the bundle's preprocessing."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dataset = config.dataset
    if dataset.startswith(image_folder.PREFIX):
        return _load_folder(config, split, decoding)
    if dataset in _TORCHVISION_FOLDERS:
        return _load_named(dataset, config, split)
    if dataset.startswith("idx:"):
        folder = Path(dataset[4:])
        if not folder.is_dir():
            raise DataError(f"{dataset}: {folder} is not a directory of IDX files")
        found = _load_idx_folder(folder, split)
        if found is None and split == "test":
            found = _load_idx_folder(folder, "train")
            if found is not None:
                log.warning("%s has no t10k-* files: evaluating on the training images", folder)
        if found is None:
            raise DataError(
                f"{dataset}: no {split} images in {folder} "
                f"(expected {_IDX_STEMS[split][0]}-images-idx3-ubyte[.gz])"
            )
        return found
    if dataset.startswith("npz:"):
        return _load_npz(Path(dataset[4:]), split)
    raise DataError(f"unknown dataset {dataset!r}")


def normal_labels(
    normal_classes: tuple[int | str, ...], classes: dict[int, str] | None
) -> tuple[int, ...]:
    """The labels of `normal_classes`, each a label or, for a folder, a class folder's name."""
    if classes is None:
        named = [c for c in normal_classes if isinstance(c, str)]
        if named:
            raise DataError(
                f"data.normal_classes {list(normal_classes)}: {named[0]!r} is a name, and this "
                "data set's classes are numbers"
            )
        return tuple(int(c) for c in normal_classes)
    by_name = {name: label for label, name in classes.items()}
    numbered = all(name.isdecimal() for name in by_name)
    labels = []
    for entry in normal_classes:
        if isinstance(entry, str) and entry in by_name:
            labels.append(by_name[entry])
        elif isinstance(entry, int) and numbered:
            labels.append(entry)
        else:
            names = ", ".join(sorted(by_name))
            raise DataError(
                f"data.normal_classes {list(normal_classes)}: {entry!r} is not one of the "
                f"folder's classes ({names}); name them, e.g. data.normal_classes=[{min(by_name)}]"
            )
    return tuple(labels)


def normal_mask(images: ImageSet, normal_classes: tuple[int | str, ...]) -> np.ndarray:
    """True for images of the normal classes. Unlabelled data counts as all normal."""
    if images.labels is None:
        return np.ones(len(images), dtype=bool)
    wanted = normal_labels(normal_classes, images.classes)
    return np.isin(images.labels, np.asarray(wanted, dtype=np.int64))


def split_normal(images: ImageSet, config: DataConfig, *, seed: int) -> NormalSplit:
    """Keep the normal classes and hold out `config.val_fraction` of them (seeded shuffle)."""
    normal = images.images[normal_mask(images, config.normal_classes)]
    if images.labels is None:
        log.info("training images are unlabelled: all %d are taken as normal", len(normal))
    n_val = round(len(normal) * config.val_fraction)
    if len(normal) < 2 or n_val < 1 or n_val >= len(normal):
        raise DataError(
            f"{config.dataset}: {len(normal)} training images of normal classes "
            f"{list(config.normal_classes)}: too few to hold out data.val_fraction="
            f"{config.val_fraction} for validation"
        )
    order = np.random.default_rng(seed).permutation(len(normal))
    return NormalSplit(train=normal[order[n_val:]], val=normal[order[:n_val]])


# --- inputs of `vaewatch score` -----------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_image_files(path: Path, decoding: ImageDecoding | None) -> ImageSet:
    """A folder's image files (at any depth, named by their path in it) or one image file."""
    if decoding is None:  # a caller's bug: scoring image files needs the bundle's preprocessing
        raise ValueError("image files need the preprocessing of a bundle (decoding=)")
    if not path.is_dir():
        try:
            return ImageSet(preprocess_image(path, decoding)[None, :], None, [str(path)])
        except ImageError as exc:
            raise DataError(f"{path}: {exc.reason}: {exc}") from None
    try:
        images, _, names = image_folder.decode_files(
            image_folder.every_file(path), decoding, what=f"the images in {path}"
        )
    except image_folder.FolderError as exc:
        raise DataError(str(exc)) from None
    return ImageSet(images, None, names)


def read_image_file(path: str | Path, *, decoding: ImageDecoding | None = None) -> ImageSet:
    """Images to score from .npy, .npz (`x`, optional `y`), an IDX file, an image file or a
    folder of them (through `decoding`, the bundle's preprocessing); a file with no images is an
    error, not an empty result."""
    images = _read_image_input(Path(path), decoding)
    if len(images) == 0:
        raise DataError(f"{path}: holds no images (shape {tuple(images.images.shape)})")
    return images


def _read_image_input(path: Path, decoding: ImageDecoding | None) -> ImageSet:
    if path.is_dir():
        return _read_image_files(path, decoding)
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    name = path.name.lower()
    if name.endswith(IMAGE_SUFFIXES):
        return _read_image_files(path, decoding)
    if name.endswith(".npy"):
        try:
            # Memory-mapped: a header that promises more data than the file holds is an error
            # here, before any allocation, and dtype and shape are checked before the copy.
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{path}: not a readable .npy file ({_first_line(exc)})") from None
        return ImageSet(np.array(as_uint8_images(array, source=str(path))))
    if name.endswith(".npz"):
        return _load_npz(path, "train")
    if "idx" in name or name.endswith(("ubyte", "ubyte.gz")):
        return ImageSet(as_uint8_images(read_idx(path), source=str(path)))
    raise DataError(
        f"{path}: unknown input format (use .npy, .npz, an IDX file, an image file "
        f"({', '.join(IMAGE_SUFFIXES)}) or a folder of them)"
    )
