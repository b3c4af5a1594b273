"""Score variants on one-class Fashion-MNIST, all on the same trained models (issue 13).

`train` fits the configured VAE once per class (as bench/one_class_auroc.py does) and saves, for
the training, held-out and test images, what the variants are made of: the negative ELBO at
z = mu, mu, the top-k % squared pixel errors and (with --shifts) the ELBO averaged over four
1-pixel shifts. `table` then evaluates every variant: AUROC, TPR and FPR at the conformal
threshold calibrated on the held-out images, each term z-normalised on the training images.

    .venv/bin/python bench/score_variants.py train --out runs/variants --classes 0 1 2 [--shifts]
    .venv/bin/python bench/score_variants.py table --out runs/variants
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from detector.model import to_model_input
from trainer.calibrate import calibrate_threshold
from trainer.data import load_images, split_normal
from trainer.evaluate import auroc
from trainer.fit import fit_vae
from trainer.latent import _log_gaussians, fit_gaussian_mixture, latent_means, score_terms
from vaewatch.config import load_settings

PARTS = ("train", "val", "test")
TOP_PERCENT = (1, 5, 10)
SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))


@torch.inference_mode()
def squared_errors(model, images: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(images), 2048):
        x = to_model_input(torch.from_numpy(np.ascontiguousarray(images[start : start + 2048])))
        out.append(((torch.sigmoid(model.decode(model.encode(x)[0])) - x) ** 2).numpy())
    return np.concatenate(out)


def shifted(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    moved = np.roll(images.reshape(-1, 28, 28), (dy, dx), axis=(1, 2))
    return np.ascontiguousarray(moved.reshape(-1, 784))


def train(args, settings, train_set, test_set) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = torch.device("cpu")
    for c in args.classes:
        data = settings.data.model_copy(update={"normal_classes": (c,)})
        split = split_normal(train_set, data, seed=settings.train.seed)
        started = time.perf_counter()
        model = fit_vae(split.train, split.val, model_config=settings.model, train=settings.train)
        seconds = time.perf_counter() - started
        arrays = {}
        for part, images in zip(PARTS, (split.train, split.val, test_set.images), strict=True):
            arrays[f"{part}_elbo"] = score_terms(model.model, images, device=cpu)[:, 0]
            arrays[f"{part}_mu"] = latent_means(model.model, images, device=cpu)
            errors = np.sort(squared_errors(model.model, images), axis=1)
            for k in TOP_PERCENT:
                arrays[f"{part}_top{k}"] = errors[:, -int(784 * k / 100) :].mean(1)
            if args.shifts:
                moved = [score_terms(model.model, shifted(images, *s), device=cpu)[:, 0]
                         for s in SHIFTS]  # fmt: skip
                arrays[f"{part}_shifts"] = np.mean([arrays[f"{part}_elbo"], *moved], axis=0)
        np.savez(args.out / f"class{c}.npz", **arrays, seconds=seconds)
        print(f"class {c}: trained and saved in {seconds:.0f} s", flush=True)


def complexities(images: np.ndarray) -> dict[str, np.ndarray]:
    """Candidate complexity measures of uint8 N x 784 images."""
    x = images.reshape(-1, 28, 28).astype(np.float64)
    left = np.pad(x, ((0, 0), (0, 0), (1, 0)))[:, :, :-1]
    up = np.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1, :]
    up_left = np.pad(x, ((0, 0), (1, 0), (1, 0)))[:, :-1, :-1]
    median = np.median(np.stack([left, up, left + up - up_left]), axis=0)
    return {
        "tv": np.abs(np.diff(x, axis=2)).sum((1, 2)) + np.abs(np.diff(x, axis=1)).sum((1, 2)),
        "zlib": np.array([8.0 * len(zlib.compress(im.tobytes(), 9)) for im in images]),
        "nonzero": (x > 0).sum((1, 2)).astype(np.float64),
        "mass": x.sum((1, 2)),
        "median_residual": np.log2(1 + np.abs(x - median)).sum((1, 2)),
    }


def mixture_nll(train_mu: np.ndarray, k: int):
    means, trils, weights = fit_gaussian_mixture(train_mu, k, seed=0)
    return lambda mu: -np.logaddexp.reduce(_log_gaussians(mu, means, trils) + np.log(weights), 1)


def fuse(terms: list[tuple[np.ndarray, ...]], weights: list[float]) -> tuple[np.ndarray, ...]:
    """sum_i w_i (t_i - mean_train) / sd_train, for the train, val and test parts."""
    total = [0.0, 0.0, 0.0]
    for term, w in zip(terms, weights, strict=True):
        centre, scale = term[0].mean(), term[0].std()
        total = [t + w * (part - centre) / scale for t, part in zip(total, term, strict=True)]
    return tuple(total)


def variants(d: dict, comp: dict[str, tuple]) -> dict[str, tuple]:
    def parts(key: str) -> tuple:
        return tuple(d[f"{p}_{key}"] for p in PARTS)

    out = {"elbo": parts("elbo")}
    for k in (1, 3, 5, 8):
        nll = mixture_nll(d["train_mu"], k)
        out[f"lat{k}"] = tuple(nll(d[f"{p}_mu"]) for p in PARTS)
        out[f"elbo+lat{k}"] = fuse([out["elbo"], out[f"lat{k}"]], [1, 1])
        out[f"elbo+lat{k}-tv"] = fuse([out["elbo"], out[f"lat{k}"], comp["tv"]], [1, 1, -1])
    for w in (0.5, 2):
        out[f"elbo+{w}lat1"] = fuse([out["elbo"], out["lat1"]], [1, w])
    for lw in (0.5, 1, 2):
        for tw in (0.5, 0.75, 1, 1.5):
            out[f"elbo+{lw}lat8-{tw}tv"] = fuse(
                [out["elbo"], out["lat8"], comp["tv"]], [1, lw, -tw]
            )
    out["elbo-tv"] = fuse([out["elbo"], comp["tv"]], [1, -1])
    pairs = zip(out["elbo"], comp["zlib"], strict=True)
    out["elbo-zlib_nats"] = tuple(e - np.log(2) * bits for e, bits in pairs)
    for name in ("zlib", "nonzero", "mass", "median_residual"):
        out[f"elbo+lat5-{name}"] = fuse([out["elbo"], out["lat5"], comp[name]], [1, 1, -1])
    for k in TOP_PERCENT:
        out[f"top{k}"] = parts(f"top{k}")
    out["elbo+top5+lat1"] = fuse([out["elbo"], parts("top5"), out["lat1"]], [1, 1, 1])
    if "train_shifts" in d:
        out["shifts"] = parts("shifts")
        out["shifts+lat1"] = fuse([parts("shifts"), out["lat1"]], [1, 1])
    return out


def table(args, settings, train_set, test_set) -> None:
    files = sorted(args.out.glob("class*.npz"), key=lambda f: int(f.stem[5:]))
    test_comp = complexities(test_set.images)
    results: dict[str, dict[int, tuple[float, float, float]]] = {}
    for file in files:
        c = int(file.stem[5:])
        d = dict(np.load(file))
        split = split_normal(
            train_set, settings.data.model_copy(update={"normal_classes": (c,)}), seed=0
        )
        train_comp, val_comp = complexities(split.train), complexities(split.val)
        comp = {k: (train_comp[k], val_comp[k], test_comp[k]) for k in test_comp}
        is_anomaly = test_set.labels != c
        for name, (_, val, test) in variants(d, comp).items():
            threshold = calibrate_threshold(val, target_fpr=0.01).threshold
            flagged = test > threshold
            results.setdefault(name, {})[c] = (
                auroc(is_anomaly, test),
                float(flagged[is_anomaly].mean()),
                float(flagged[~is_anomaly].mean()),
            )
    print("| score variant | classes | mean AUROC | mean TPR | mean test FPR | per-class AUROC |")
    print("|---|---|---|---|---|---|")
    for name, per in results.items():
        classes = sorted(per)
        auc, tpr, fpr = (np.mean([per[c][i] for c in classes]) for i in range(3))
        cells = " ".join(f"{per[c][0]:.3f}" for c in classes)
        print(f"| {name} | {len(classes)} | {auc:.3f} | {tpr:.3f} | {fpr:.4f} | {cells} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["train", "table"])
    parser.add_argument("--out", type=Path, required=True, help="folder of the saved arrays")
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--shifts", action="store_true", help="also the test-time shifts")
    parser.add_argument("--set", action="append", default=[], help="config override k=v")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings(args.config, [*args.set, "train.progress=false"])
    train_set = load_images(settings.data, split="train")
    test_set = load_images(settings.data, split="test")
    (train if args.command == "train" else table)(args, settings, train_set, test_set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
