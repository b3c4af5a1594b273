"""One-class Fashion-MNIST: train on one class, score all 10,000 test images, report AUROC.

The protocol of GEOM (Golan & El-Yaniv, 2018) and the env notes: for each class c, fit on the
training images of class c only (minus the validation share used for early stopping and the
threshold), then score the whole test set with the other nine classes as anomalies. Per class it
reports AUROC, AUPRC, the TPR (share of the 9,000 anomalies caught) and the FPR (share of the
1,000 normal test images flagged) at the conformal threshold calibrated on the held-out normal
images, training seconds and scoring images/s (the detector's score of the 10,000 test images, in
batches of 4,096, on this process's threads).

Variants are config overrides on top of config.yaml, compared side by side in one run:

    .venv/bin/python bench/one_class_auroc.py                       # default config, 10 classes
    .venv/bin/python bench/one_class_auroc.py --classes 0 2 6 \\
        --variant default= \\
        --variant bernoulli=model.likelihood=bernoulli \\
        --variant "mlp=model.kind=mlp;model.latent_dim=20"

(`name=key=value;key=value`; an empty override list is the config as it is.)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trainer.calibrate import calibrate_threshold
from trainer.data import load_images, split_normal
from trainer.evaluate import auprc, auroc
from trainer.fit import fit_vae, score_images
from vaewatch.config import load_settings

# Published per-class AUROC on this protocol, for the table.
SEED_MEAN = 0.76  # the seed's MLP VAE, 10 epochs (env notes; no per-class figures)
GEOM = [0.994, 0.976, 0.911, 0.899, 0.921, 0.934, 0.833, 0.989, 0.908, 0.992]
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    return name, [o for o in overrides.split(";") if o]


def run_class(settings, normal_class: int, train_set, test_set) -> dict:
    data = settings.data.model_copy(update={"normal_classes": (normal_class,)})
    split = split_normal(train_set, data, seed=settings.train.seed)
    started = time.perf_counter()
    fitted = fit_vae(split.train, split.val, model_config=settings.model, train=settings.train)
    seconds = time.perf_counter() - started
    device = fitted.model.fc_mu.weight.device
    scoring_started = time.perf_counter()
    scores = score_images(fitted.model, test_set.images, device=device)
    scoring_seconds = time.perf_counter() - scoring_started
    is_anomaly = test_set.labels != normal_class
    calibration = calibrate_threshold(
        score_images(fitted.model, split.val, device=device),
        target_fpr=settings.calibration.target_fpr,
    )
    flagged = scores > calibration.threshold
    return {
        "class": normal_class,
        "auroc": auroc(is_anomaly, scores),
        "auprc": auprc(is_anomaly, scores),
        "tpr": float(np.mean(flagged[is_anomaly])),
        "test_fpr": float(np.mean(flagged[~is_anomaly])),
        "images_per_s": len(scores) / scoring_seconds,
        "epochs": len(fitted.history),
        "best_epoch": fitted.best_epoch,
        "seconds": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--variant", action="append", default=[], help="name=k=v;k=v")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variant] or [("default", [])]
    base = load_settings(args.config)
    train_set = load_images(base.data, split="train")
    test_set = load_images(base.data, split="test")
    results: dict[str, list[dict]] = {}
    for name, overrides in variants:
        settings = load_settings(args.config, [*overrides, "train.progress=false"])
        results[name] = []
        for c in args.classes:
            row = run_class(settings, c, train_set, test_set)
            results[name].append(row)
            print(
                f"{name:>12} class {c} ({CLASS_NAMES[c]}): AUROC {row['auroc']:.4f}, "
                f"AUPRC {row['auprc']:.4f}, TPR {row['tpr']:.3f}, test FPR {row['test_fpr']:.4f}, "
                f"{row['epochs']} epochs (best {row['best_epoch']}), {row['seconds']:.0f} s, "
                f"scoring {row['images_per_s']:.0f} images/s",
                flush=True,
            )
    print()
    header = "| class | " + " | ".join(results) + " | GEOM |"
    print(header)
    print("|" + "---|" * (len(results) + 2))
    for i, c in enumerate(args.classes):
        cells = " | ".join(f"{results[n][i]['auroc']:.3f}" for n in results)
        print(f"| {c} {CLASS_NAMES[c]} | {cells} | {GEOM[c]:.3f} |")
    means = " | ".join(f"**{np.mean([r['auroc'] for r in results[n]]):.3f}**" for n in results)
    geom_mean = np.mean([GEOM[c] for c in args.classes])
    print(f"| mean | {means} | {geom_mean:.3f} |")

    def mean_row(label: str, key: str, fmt: str) -> None:
        cells = " | ".join(format(np.mean([r[key] for r in results[n]]), fmt) for n in results)
        print(f"| {label} | {cells} | |")

    target = base.calibration.target_fpr
    mean_row("mean AUPRC", "auprc", ".3f")
    mean_row(f"mean TPR at the calibrated threshold (target FPR {target:g})", "tpr", ".3f")
    mean_row(f"mean test FPR (target {target:g})", "test_fpr", ".4f")
    mean_row("training s/class", "seconds", ".0f")
    mean_row("scoring images/s", "images_per_s", ".0f")
    print("\nTPR at the calibrated threshold per class:")
    for n in results:
        print(f"  {n}: " + " ".join(f"{r['tpr']:.3f}" for r in results[n]))
    print(f"\nseed's MLP VAE (10 classes): mean {SEED_MEAN}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"variants": dict(variants), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
