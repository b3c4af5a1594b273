"""Subcommands train, evaluate, score and sample (owned by the trainer work)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import numpy as np

from detector.bundle import load_bundle
from detector.preprocess import ImageDecoding
from detector.scorer import Detector, DeviceError
from trainer.calibrate import CalibrationError
from trainer.config import DataConfig
from trainer.data import DataError, ImageSet, read_image_file
from trainer.fit import TrainingError
from vaewatch.config import Settings

log = logging.getLogger(__name__)


class CommandError(Exception):
    """A command-line argument cannot be used (e.g. an unknown output format). One line."""


USER_ERRORS: tuple[type[Exception], ...] = (
    CalibrationError,
    CommandError,
    DataError,
    DeviceError,
    TrainingError,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="fit a VAE on the normal classes, calibrate its threshold, write a model bundle",
        description="Fit a VAE on data.normal_classes of data.dataset, calibrate the threshold "
        "on held-out normal images and write a bundle (weights, calibration, report).",
    )
    train.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    train.set_defaults(run=run_train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="AUROC, AUPRC and the rates at the threshold on the labelled test split",
        description="Score the test split of the bundle's data set (normal classes vs. the "
        "rest) and write report/roc.png into the bundle.",
    )
    evaluate.add_argument("--model", type=Path, required=True, help="bundle directory")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument(
        "--dataset",
        default=None,
        help="evaluate on this data set instead of the one the bundle was trained on",
    )
    evaluate.set_defaults(run=run_evaluate)

    score = subparsers.add_parser(
        "score",
        help="score images: .npy, .npz, IDX, image files of any size, or folders of them",
        description="Write index, score, p_value and anomaly (and name) for every input image: "
        "CSV, or JSON lines when --out ends in .jsonl/.json. Arrays are uint8 (N x 28 x 28 or N "
        "x 784); image files (PNG, JPEG, BMP, TIFF, WebP, GIF; a folder's at any depth) become "
        "the model's input by the bundle's preprocessing, as the worker and `vaewatch serve` "
        "make them. A file that cannot be read gets one line on stderr and no row; an input "
        "with no images is an error.",
    )
    score.add_argument("--model", type=Path, required=True, help="bundle directory")
    score.add_argument(
        "input",
        type=Path,
        nargs="+",
        help=".npy/.npz/IDX files, image files, or folders of image files",
    )
    score.add_argument("--out", type=Path, default=None, help="output file (default: stdout)")
    score.add_argument("--format", choices=["csv", "jsonl"], default=None, help="output format")
    score.set_defaults(run=run_score)

    sample = subparsers.add_parser(
        "sample",
        help="generate images from the model (PNG grid or .npz)",
        description="Decode z drawn from the latent density fitted to the training images (or "
        "from the N(0, I) prior with --prior, or when the bundle has no density) into images "
        "(the decoder's mean), e.g. for augmentation.",
    )
    sample.add_argument("--model", type=Path, required=True, help="bundle directory")
    sample.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    sample.add_argument("--out", type=Path, required=True, help="output .png grid or .npz")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sample.add_argument(
        "--prior", action="store_true", help="draw z from the N(0, I) prior instead"
    )
    sample.set_defaults(run=run_sample)

    recalibrate = subparsers.add_parser(
        "recalibrate",
        help="same weights, new threshold and calibration scores from fresh normal data",
        description="Score fresh normal images with the bundle's model, set the conformal "
        "threshold on them and write a new bundle (new version) to --out (docs/lifecycle.md).",
    )
    recalibrate.add_argument("--model", type=Path, required=True, help="bundle directory")
    recalibrate.add_argument(
        "--data",
        required=True,
        help="normal images: a file `score` reads (.npy/.npz/IDX, image files or a folder of "
        "them), a data set (fashion-mnist, mnist, idx:DIR, npz:FILE, folder:DIR) or a topic "
        "range "
        "kafka:TOPIC[:PARTITION[:START-END]] read with the stream settings",
    )
    recalibrate.add_argument("--out", type=Path, required=True, help="new bundle directory")
    recalibrate.add_argument(
        "--split",
        choices=["train", "test"],
        default="train",
        help="split of a data set given to --data (default train)",
    )
    recalibrate.add_argument(
        "--target-fpr",
        type=float,
        default=None,
        help="false-positive rate to calibrate for (default: the bundle's own)",
    )
    recalibrate.set_defaults(run=run_recalibrate)


def _detector(args: argparse.Namespace, settings: Settings) -> Detector:
    return Detector.from_bundle(args.model, settings.detector)


def run_train(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.fit import train_bundle

    bundle = train_bundle(
        data=settings.data,
        model=settings.model,
        train=settings.train,
        calibration=settings.calibration,
        out=args.out,
        image_settings=settings.images,
    )
    best = bundle.metadata.get("best_epoch")
    calibration = bundle.calibration
    print(
        f"model {bundle.version} written to {args.out}: threshold {calibration.threshold:.4g} "
        f"({calibration.method}, target FPR {calibration.target_fpr:g}, n={calibration.n}), "
        f"best epoch {best}"
    )
    return 0


def _evaluation_data(
    recorded: dict | None, args: argparse.Namespace, settings: Settings
) -> DataConfig:
    """The data set and normal classes the bundle was trained on, unless --dataset says other."""
    data = DataConfig.model_validate(recorded) if recorded else settings.data
    if args.dataset:
        data = data.model_copy(update={"dataset": DataConfig(dataset=args.dataset).dataset})
    return data


def run_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.evaluate import evaluate_detector, write_roc_report

    bundle = load_bundle(args.model)
    detector = Detector.from_bundle(bundle, settings.detector)
    try:
        data = _evaluation_data(bundle.metadata.get("data"), args, settings)
    except ValueError as exc:  # pydantic's ValidationError: an unknown --dataset form
        raise CommandError(f"--dataset {args.dataset!r}: {exc.errors()[0]['msg']}") from None
    result = evaluate_detector(
        detector, data, decoding=settings.images.decoding(detector.preprocessing)
    )
    roc = write_roc_report(args.model, result)
    values = result.evaluation.as_dict()
    if args.json:
        print(json.dumps({**values, "model_version": detector.version, "dataset": data.dataset}))
        return 0
    print(f"model {detector.version} on {data.dataset}, normal classes {list(data.normal_classes)}")
    for key, value in values.items():
        print(f"  {key:<10} {value:.4f}" if isinstance(value, float) else f"  {key:<10} {value}")
    if roc is not None:
        print(f"  ROC curve: {roc}")
    return 0


@contextmanager
def _output(path: Path | None) -> Iterator[TextIO]:
    if path is None:
        try:
            yield sys.stdout
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader (e.g. `| head`) has gone: stop quietly, as Unix tools do. Pointing
            # stdout at /dev/null keeps the interpreter's final flush from raising again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    try:
        with path.open("w", newline="") as stream:
            yield stream
    except OSError as exc:
        raise CommandError(f"{path}: cannot write ({exc.strerror})") from None


def _score_inputs(inputs: list[Path], decoding: ImageDecoding) -> ImageSet:
    """The images of every input, in order. One input keeps its own names (a folder's file
    paths in it, or none for an array); several give every image a name: the file, the file in
    the folder, or the array's name with the image's index."""
    sets = [read_image_file(path, decoding=decoding) for path in inputs]
    if len(sets) == 1:
        return sets[0]
    names = []
    for path, found in zip(inputs, sets, strict=True):
        if found.names is None:
            names += [f"{path}[{i}]" for i in range(len(found))]
        elif path.is_dir():
            names += [(path / name).as_posix() for name in found.names]
        else:
            names += found.names
    return ImageSet(np.concatenate([found.images for found in sets]), None, names)


def run_score(args: argparse.Namespace, settings: Settings) -> int:
    detector = _detector(args, settings)
    images = _score_inputs(args.input, settings.images.decoding(detector.preprocessing))
    fmt = args.format
    if fmt is None:
        suffix = args.out.suffix.lower() if args.out else ""
        fmt = "jsonl" if suffix in (".jsonl", ".json", ".ndjson") else "csv"
    result = detector.score(images.images)
    names = [images.names] if images.names else []
    # Whole columns as Python values, written by the csv module's C loop: a row dict per image
    # cost a quarter of a second for 60,000 images. repr() keeps every float's digits.
    index = range(len(result))
    scores, p_values = result.scores.tolist(), result.p_values.tolist()
    anomalous = result.anomalous.tolist()
    with _output(args.out) as stream:
        if fmt == "csv":
            writer = csv.writer(stream, lineterminator="\n")
            writer.writerow(["index", "score", "p_value", "anomaly", *(["name"] if names else [])])
            texts = map(repr, scores), map(repr, p_values), map(int, anomalous)
            writer.writerows(zip(index, *texts, *names, strict=True))
        else:
            keys = ("index", "score", "p_value", "anomaly", "name")[: 4 + len(names)]
            rows = zip(index, scores, p_values, anomalous, *names, strict=True)
            stream.writelines(json.dumps(dict(zip(keys, row, strict=True))) + "\n" for row in rows)
    log.info(
        "scored %d images with model %s: %d anomalies (threshold %.4g)",
        len(result), detector.version, int(result.anomalous.sum()), detector.threshold,
    )  # fmt: skip
    return 0


def run_sample(args: argparse.Namespace, settings: Settings) -> int:
    from detector.explain import to_uint8
    from trainer.report import samples, save_grid

    if args.n < 1:
        raise CommandError(f"--n must be at least 1, got {args.n}")
    suffix = args.out.suffix.lower()
    if suffix not in (".png", ".npz"):
        raise CommandError(f"--out {args.out}: use a .png (image grid) or .npz (array x) file")
    model = load_bundle(args.model).model
    images = to_uint8(samples(model, args.n, seed=args.seed, prior=args.prior))
    try:
        if suffix == ".png":
            save_grid(args.out, images, columns=math.ceil(math.sqrt(args.n)))
        else:
            np.savez_compressed(args.out, x=images.reshape(-1, 28, 28))
    except OSError as exc:
        raise CommandError(f"{args.out}: cannot write ({exc.strerror})") from None
    print(f"{args.n} samples written to {args.out}")
    return 0


def _recalibration_images(
    args: argparse.Namespace,
    settings: Settings,
    normal_classes: tuple[int | str, ...],
    decoding: ImageDecoding,
) -> tuple[np.ndarray, dict]:
    """--data read by the library that knows its kind: a Kafka topic range, or a file or data
    set; image files as the bundle's preprocessing (`decoding`) makes them its input."""
    if args.data.startswith("kafka:"):  # streams.topic_range.PREFIX; Kafka loads only then
        from streams.topic_range import TopicRangeError, parse_topic_range, read_topic_range

        try:
            found = read_topic_range(
                parse_topic_range(args.data), config=settings.stream, images=decoding
            )
        except TopicRangeError as exc:
            raise CommandError(f"--data {exc}") from None
        return found.images, found.provenance
    from trainer.recalibrate import calibration_source

    return calibration_source(
        args.data,
        normal_classes=normal_classes,
        split=args.split,
        data=settings.data,
        decoding=decoding,
    )


def run_recalibrate(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.recalibrate import recalibrate_bundle

    if args.target_fpr is not None and not 0.0 < args.target_fpr < 1.0:
        raise CommandError(f"--target-fpr must lie in (0, 1), got {args.target_fpr}")
    old = load_bundle(args.model)
    recorded = old.metadata.get("data") or {}
    normal_classes = tuple(recorded.get("normal_classes") or settings.data.normal_classes)
    decoding = settings.images.decoding(old.preprocessing)
    images, details = _recalibration_images(args, settings, normal_classes, decoding)
    bundle = recalibrate_bundle(
        args.model,
        images,
        out=args.out,
        source=args.data,
        target_fpr=args.target_fpr,
        detector=settings.detector,
        source_details=details,
    )
    calibration = bundle.calibration
    print(
        f"model {bundle.version} written to {args.out}: weights of {old.version}, threshold "
        f"{old.calibration.threshold:.4g} -> {calibration.threshold:.4g} "
        f"(target FPR {calibration.target_fpr:g}, n={calibration.n} from {args.data})"
    )
    return 0
