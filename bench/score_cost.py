"""Scoring cost of the fused anomaly score against the plain negative ELBO, side by side.

The same model (untrained: speed does not depend on the weights) scores the 10,000 Fashion-MNIST
test images in batches of 1,024 with `VAE.elbo_score` and with `VAE.score` (negative ELBO +
latent term + complexity term), alternating, for each model kind; prints the median images/s of
each and their ratio.

    .venv/bin/python bench/score_cost.py [--threads 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from detector.config import ModelConfig
from detector.model import VAE, to_model_input
from trainer.config import DataConfig
from trainer.data import load_images

BATCH = 1024


def images_per_s(score, x: torch.Tensor) -> float:
    started = time.perf_counter()
    for start in range(0, len(x), BATCH):
        score(x[start : start + BATCH])
    return len(x) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = to_model_input(torch.from_numpy(load_images(DataConfig(), split="test").images))
    for kind in ("conv", "mlp"):
        torch.manual_seed(0)
        model = VAE(ModelConfig(kind=kind)).eval()
        rates: dict[str, list[float]] = {"plain": [], "fused": []}
        with torch.inference_mode():
            for _ in range(args.rounds):
                rates["plain"].append(images_per_s(model.elbo_score, x))
                rates["fused"].append(images_per_s(model.score, x))
        plain, fused = statistics.median(rates["plain"]), statistics.median(rates["fused"])
        print(
            f"{kind}: plain negative ELBO {plain:7.0f} images/s, fused score {fused:7.0f} "
            f"images/s, ratio {fused / plain:.2f}x ({args.threads} thread(s), "
            f"median of {args.rounds})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
