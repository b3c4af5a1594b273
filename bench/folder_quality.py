"""One-class AUROC from a folder of image files against the native 28 x 28 arrays, side by side.

    .venv/bin/python bench/folder_quality.py --classes 0 1 7 [--folder /tmp/fashion-jpeg]

Fashion-MNIST is written out as a user's folder would hold it: 64 x 64 JPEG files, quality 90
(each image upscaled with Pillow's bicubic filter), in ImageFolder layout (`train/<label>/`,
`test/<label>/`). The folder is read back as `vaewatch train` reads `data.dataset=folder:DIR`,
through the default preprocessing (pad, Lanczos, luma, invert decided by `auto`). Per class, the
default model is trained with the same seed on the native arrays and on the folder's images and
scored on the whole test set (native, or the folder's test/), the protocol of
bench/one_class_auroc.py; a third column trains on the native arrays with another seed, so the
difference between the first two can be read against the run-to-run spread.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from one_class_auroc import CLASS_NAMES, run_class

from detector.preprocess import ImageSettings
from trainer.data import ImageSet, load_images, training_preprocessing
from vaewatch.config import load_settings


def write_folder(root: Path, train: ImageSet, test: ImageSet, classes: list[int]) -> None:
    """The training images of `classes` and the whole test set as 64 x 64 JPEG files."""
    for split, images, keep in (("train", train, classes), ("test", test, list(range(10)))):
        for label in keep:
            folder = root / split / str(label)
            if folder.is_dir():
                continue  # written by an earlier run
            folder.mkdir(parents=True)
            for i, pixels in enumerate(images.images[images.labels == label]):
                picture = Image.fromarray(pixels.reshape(28, 28)).resize(
                    (64, 64), Image.Resampling.BICUBIC
                )
                picture.save(folder / f"{i:05d}.jpg", quality=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--classes", type=int, nargs="+", default=[0, 1, 7])
    parser.add_argument("--folder", type=Path, default=None, help="where to write the JPEGs")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    settings = load_settings(args.config, ["train.progress=false"])
    native_train = load_images(settings.data, split="train")
    native_test = load_images(settings.data, split="test")
    root = args.folder or Path(tempfile.mkdtemp(prefix="fashion-jpeg-"))
    started = time.perf_counter()
    write_folder(root, native_train, native_test, args.classes)
    print(f"folder {root}: written in {time.perf_counter() - started:.0f} s", flush=True)
    folder_data = settings.data.model_copy(update={"dataset": f"folder:{root}"})
    preprocessing = training_preprocessing(folder_data, settings.images)
    decoding = ImageSettings().decoding(preprocessing)
    started = time.perf_counter()
    folder_train = load_images(folder_data, split="train", decoding=decoding)
    folder_test = load_images(folder_data, split="test", decoding=decoding)
    seconds = time.perf_counter() - started
    n_files = len(folder_train) + len(folder_test)
    in_folder_order = native_test.images[np.argsort(native_test.labels, kind="stable")]
    difference = np.abs(folder_test.images.astype(int) - in_folder_order.astype(int)).mean()
    print(
        f"read back {n_files} files in {seconds:.1f} s ({n_files / seconds:.0f} files/s, "
        f"{decoding.threads} threads); preprocessing {preprocessing.model_dump()}; the test "
        f"images differ from the native ones by {difference:.2f} grey levels on average",
        flush=True,
    )
    other_seed = load_settings(args.config, ["train.progress=false", "train.seed=1"])
    rows = []
    for c in args.classes:
        native = run_class(settings, c, native_train, native_test)
        folder = run_class(settings, c, folder_train, folder_test)
        seed1 = run_class(other_seed, c, native_train, native_test)
        rows.append((c, native, folder, seed1))
        print(
            f"class {c} ({CLASS_NAMES[c]}): native {native['auroc']:.4f}, folder "
            f"{folder['auroc']:.4f} (difference {folder['auroc'] - native['auroc']:+.4f}), native "
            f"seed 1 {seed1['auroc']:.4f}; {native['seconds']:.0f} / {folder['seconds']:.0f} / "
            f"{seed1['seconds']:.0f} s",
            flush=True,
        )
    print(f"\nload average {os.getloadavg()[0]:.1f}\n")
    print("| class | native 28 x 28 | 64 x 64 JPEG folder | difference | native, seed 1 |")
    print("|---|---:|---:|---:|---:|")
    for c, native, folder, seed1 in rows:
        print(
            f"| {c} {CLASS_NAMES[c]} | {native['auroc']:.4f} | {folder['auroc']:.4f} | "
            f"{folder['auroc'] - native['auroc']:+.4f} | {seed1['auroc']:.4f} |"
        )
    means = [np.mean([row[k]["auroc"] for row in rows]) for k in (1, 2, 3)]
    print(
        f"| mean | {means[0]:.4f} | {means[1]:.4f} | {means[1] - means[0]:+.4f} | {means[2]:.4f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
