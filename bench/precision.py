"""CPU scoring precision (issues 21 and 29): fp32 against int8 and bf16 (and the other CPU
variants), side by side in one process, for quality and for speed. Both CPU modes (native and
restricted to AVX2 without bf16) in one command: bench/cpu_modes.py -- bench/precision.py ...

Three steps, each its own subcommand:

    # one bundle per class and model kind (default config; the conv default and model.kind=mlp),
    # cached under --bundles (skips the classes already there)
    .venv/bin/python bench/precision.py train --bundles /tmp/vaewatch-precision --threads 1

    # per-class AUROC and test FPR at the calibrated threshold, fp32 against int8 and bf16, and
    # whether trainer.calibrate.validate_precisions passes each on the calibration images (int8
    # with activation ranges measured on the training images, as `vaewatch train` does)
    .venv/bin/python bench/precision.py quality --bundles /tmp/vaewatch-precision

    # images/s of each variant, alternating in one process, and the cost of each score term
    .venv/bin/python bench/precision.py speed --bundles /tmp/vaewatch-precision --threads 1 \\
        --rounds 15 --images 2048

Speed is reported as ratios against the model as scored before issue 21 (VAE.score in batches of
1,024), measured in the same rounds (medians over rounds of rotating order), never absolute
times alone: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from detector.bundle import load_bundle, save_bundle
from detector.config import PRECISIONS
from detector.int8 import activation_ranges
from detector.loss import total_variation
from detector.model import VAE, to_model_input
from detector.scorer import CPU_CHUNK, cpu_scoring_model, resolve_precision, score_batches
from trainer.calibrate import calibrate_threshold, validate_precisions
from trainer.data import load_images, split_normal
from trainer.evaluate import auroc
from trainer.fit import fit_vae, score_images
from vaewatch.config import load_settings

KINDS = {"conv": [], "mlp": ["model.kind=mlp"]}
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
BAND = 0.003  # issue 21: per-class AUROC and test FPR within this of fp32


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def train(args: argparse.Namespace) -> int:
    base = load_settings(args.config)
    train_set = load_images(base.data, split="train")
    for kind, overrides in KINDS.items():
        if args.kinds and kind not in args.kinds:
            continue
        settings = load_settings(
            args.config, [*overrides, "train.progress=false", "train.device=cpu"]
        )
        for c in args.classes:
            out = args.bundles / kind / str(c)
            if (out / "bundle.json").is_file():
                continue
            data = settings.data.model_copy(update={"normal_classes": (c,)})
            split = split_normal(train_set, data, seed=settings.train.seed)
            started = time.perf_counter()
            fitted = fit_vae(
                split.train, split.val, model_config=settings.model, train=settings.train
            )
            val_scores = score_images(fitted.model, split.val, device=torch.device("cpu"))
            calibration = calibrate_threshold(
                val_scores, target_fpr=settings.calibration.target_fpr
            )
            save_bundle(out, model=fitted.model.cpu(), calibration=calibration)
            print(
                f"{kind} class {c}: trained in {time.perf_counter() - started:.0f} s "
                f"(load {load_average()})",
                flush=True,
            )
    return 0


def _scores(model: VAE, images: np.ndarray, precision: str, ranges: dict | None) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    cpu = torch.device("cpu")
    return score_batches(
        model, tensor, device=cpu, batch_size=1024, precision=precision, int8_ranges=ranges
    ).numpy()


OTHERS = ("int8", "bf16")


def quality(args: argparse.Namespace) -> int:
    """Per class: AUROC and test FPR at the bundle's calibrated threshold in fp32, int8 and bf16
    on the 10,000 test images, and whether validate_precisions passes each on the calibration
    images (the same split the bundle was calibrated on)."""
    base = load_settings(args.config)
    train_set = load_images(base.data, split="train")
    test = load_images(base.data, split="test")
    others = tuple(args.precisions)
    print(f"load average at start: {load_average()}")
    for kind, overrides in KINDS.items():
        if args.kinds and kind not in args.kinds:
            continue
        settings = load_settings(args.config, overrides)
        names = " | ".join(others)
        print(
            f"\n{kind}:\n| class | AUROC fp32 | {names} | test FPR fp32 | {names} | "
            f"validated at calibration: {', '.join(others)} |\n|---|---|"
            + "---|"
            * (2 * len(others) + 2)
        )
        rows = []
        for c in args.classes:
            bundle = load_bundle(args.bundles / kind / str(c))
            model = bundle.model
            normal = test.labels == c
            data = settings.data.model_copy(update={"normal_classes": (c,)})
            split = split_normal(train_set, data, seed=settings.train.seed)
            checked = validate_precisions(
                model, split.val, bundle.calibration, precisions=others, range_images=split.train
            )
            checks, ranges = checked.precision_checks, checked.int8_ranges
            threshold = bundle.calibration.threshold
            row = {}
            for precision in ("fp32", *others):
                scores = _scores(model, test.images, precision, ranges)
                row[f"auroc_{precision}"] = auroc(~normal, scores)
                row[f"fpr_{precision}"] = float(np.mean(scores[normal] > threshold))
            rows.append(row)

            def delta(key: str, precision: str, row: dict = row) -> str:
                return f"{row[f'{key}_{precision}'] - row[f'{key}_fp32']:+.4f}"

            passed = ", ".join(
                f"{'yes' if checks[p]['passed'] else 'NO'} "
                f"({checks[p]['fpr_reference']:.4f} -> {checks[p]['fpr']:.4f})"
                for p in others
            )
            aurocs = " | ".join(delta("auroc", p) for p in others)
            fprs = " | ".join(delta("fpr", p) for p in others)
            print(
                f"| {c} {CLASS_NAMES[c]} | {row['auroc_fp32']:.4f} | {aurocs} | "
                f"{row['fpr_fp32']:.4f} | {fprs} | {passed} |",
                flush=True,
            )
            row["passed"] = {p: checks[p]["passed"] for p in others}
        figures = {}
        for precision in others:
            auroc_d = max(abs(r[f"auroc_{precision}"] - r["auroc_fp32"]) for r in rows)
            fpr_d = max(abs(r[f"fpr_{precision}"] - r["fpr_fp32"]) for r in rows)
            holds = auroc_d <= BAND and fpr_d <= BAND
            figures[f"{kind} {precision} largest AUROC delta"] = auroc_d
            figures[f"{kind} {precision} largest test FPR delta"] = fpr_d
            validated = sum(r["passed"][precision] for r in rows)
            figures[f"{kind} {precision} validated bundles"] = validated
            print(
                f"{kind} {precision}: largest |AUROC delta| {auroc_d:.4f}, largest |test FPR "
                f"delta| {fpr_d:.4f}: {'HOLDS' if holds else 'does NOT hold'} the {BAND} band on "
                f"{len(rows)} classes; validated at calibration on "
                f"{validated} of {len(rows)}"
            )
        print("result: " + json.dumps(figures), flush=True)
    print(f"load average at end: {load_average()}")
    return 0


def _rate(score: Callable[[torch.Tensor], torch.Tensor], chunks: list) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for chunk in chunks:
            score(chunk)
    return sum(len(c) if isinstance(c, torch.Tensor) else len(c[0]) for c in chunks) / (
        time.perf_counter() - started
    )


def _split(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def _variants(model: VAE, x: torch.Tensor) -> dict[str, tuple[Callable, list]]:
    """name -> (score function of float images, the images in chunks). The first is the
    baseline: the model as scored before issue 21 (VAE.score, batches of 1,024)."""
    kind = model.config.kind
    chunk = CPU_CHUNK[kind]
    ranges = activation_ranges(model, x)  # the values do not change the speed
    with warnings.catch_warnings():  # torch.ao's notice that the API moves to torchao
        warnings.simplefilter("ignore")
        per_batch = torch.ao.quantization.quantize_dynamic(
            cpu_scoring_model(model, "fp32"), {torch.nn.Linear}, dtype=torch.qint8
        )
    variants = {
        "before (VAE.score, batch 1024)": (model.score, _split(x, 1024)),
        f"VAE.score, chunks of {chunk}": (model.score, _split(x, chunk)),
        "fp32 prepared, batch 1024": (cpu_scoring_model(model, "fp32").score, _split(x, 1024)),
        "fp32 prepared": (cpu_scoring_model(model, "fp32").score, _split(x, chunk)),
        "int8 prepared (fixed scales)": (
            cpu_scoring_model(model, "int8", int8_ranges=ranges).score,
            _split(x, chunk),
        ),
        "int8 per batch (issue 21's dynamic Linear)": (per_batch.score, _split(x, chunk)),
        "bf16 prepared": (cpu_scoring_model(model, "bf16").score, _split(x, chunk)),
    }
    return variants


def _terms(model: VAE, x: torch.Tensor) -> dict[str, tuple[Callable, list]]:
    """Each part of the fused score on its own (fp32 prepared), on inputs computed beforehand:
    name -> (function of one precomputed chunk, chunks)."""
    fast = cpu_scoring_model(model, "fp32")
    chunks = _split(x, CPU_CHUNK[model.config.kind])
    with torch.inference_mode():
        features = [fast.encoder(c) for c in chunks]
        mus = [(fast.fc_mu(f), fast.fc_logvar(f)) for f in features]
        logits = [fast.decode(mu) for mu, _ in mus]
    terms: dict[str, tuple[Callable, list]] = {
        "whole fused score": (fast.score, chunks),
        "encoder body": (fast.encoder, chunks),
        "fc_mu + fc_logvar": (lambda f: (fast.fc_mu(f), fast.fc_logvar(f)), features),
        "decoder": (lambda m: fast.decode(m[0]), mus),
        "negative ELBO from the logits": (
            lambda t: fast.loss(t[0], t[1], t[2][0], t[2][1]),
            [(c, lo, m) for c, lo, m in zip(chunks, logits, mus, strict=True)],
        ),
        "total variation": (total_variation, chunks),
    }
    if fast.latent is not None:
        terms["latent term -log q(mu)"] = (lambda m: fast.latent.negative_log_density(m[0]), mus)
    if fast.transform_head is not None:
        terms["transform term (head on the encoder's features)"] = (
            lambda t: fast.transform_log_probs(t[0], t[1], which=fast.scored_rotations),
            list(zip(chunks, features, strict=True)),
        )
    return terms


def speed(args: argparse.Namespace) -> int:
    test = load_images(load_settings(args.config).data, split="test")
    x = to_model_input(torch.from_numpy(test.images[: args.images]))
    print(
        f"{args.threads} thread(s), {args.rounds} rounds (order rotated each round), {len(x)} "
        f"test images per pass; load average at start: {load_average()}"
    )
    for kind in KINDS:
        if args.kinds and kind not in args.kinds:
            continue
        path = args.bundles / kind / "0"
        model = load_bundle(path).model
        variants, terms = _variants(model, x), _terms(model, x)
        # Ratios within each round (the same minute of load), median over the rounds, the order
        # rotated each round; round 0 warms up (prepared copies, oneDNN kernels), left out.
        ratios: dict[str, list[float]] = {name: [] for name in [*variants, *terms]}
        threads_ratio: list[float] = []
        # what `auto` picks on this CPU for a bundle that validated every precision
        picked = resolve_precision("auto", torch.device("cpu"), kind=kind, validated=PRECISIONS)
        ranges = activation_ranges(model, x)
        best = cpu_scoring_model(model, picked, int8_ranges=ranges).score
        names = list(variants)
        for round_ in range(args.rounds + 1):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            rate = {name: _rate(*variants[name]) for name in order}
            rate.update({name: _rate(*term) for name, term in terms.items()})
            by_threads = {}
            for threads in (1, 2) if round_ % 2 else (2, 1):
                torch.set_num_threads(threads)
                by_threads[threads] = _rate(best, _split(x, CPU_CHUNK[kind]))
            torch.set_num_threads(args.threads)
            if round_ == 0:
                continue
            baseline, whole = rate[names[0]], rate["whole fused score"]
            for name in variants:
                ratios[name].append(rate[name] / baseline)
            for name in terms:
                ratios[name].append(whole / rate[name])
            threads_ratio.append(by_threads[2] / by_threads[1])
        median = {name: statistics.median(r) for name, r in ratios.items()}
        spread = {name: (min(r), max(r)) for name, r in ratios.items()}
        print(f"\n{kind} (bundle {path}):")
        print("| variant | speed vs before (median, range over rounds) |\n|---|---|")
        for name in variants:
            low, high = spread[name]
            print(f"| {name} | {median[name]:.2f}x ({low:.2f}-{high:.2f}) |")
        figures = {f"{kind}: {name}": median[name] for name in variants}
        print("result: " + json.dumps(figures), flush=True)
        print("\n| part of the score (fp32 prepared) | share of the whole score's time |")
        print("|---|---|")
        for name in terms:
            low, high = spread[name]
            print(f"| {name} | {median[name]:.3f} ({low:.3f}-{high:.3f}) |")
        print(
            f"\n2 threads against 1 ({picked} prepared, what auto picks here): "
            f"{statistics.median(threads_ratio):.2f}x "
            f"({min(threads_ratio):.2f}-{max(threads_ratio):.2f})"
        )
    print(f"\nload average at end: {load_average()}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["train", "quality", "speed"])
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--bundles", type=Path, default=Path("/tmp/vaewatch-precision"))
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=OTHERS,
        default=list(OTHERS),
        help="quality: the precisions compared with fp32 (bf16 is emulated, slow, on AVX2)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=10_000, help="speed: test images per pass")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    return {"train": train, "quality": quality, "speed": speed}[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
