"""Sample quality of one-class VAEs: samples from the N(0, I) prior against samples from the
latent density fitted to the training latents (the default of `vaewatch sample`).

A small Fashion-MNIST classifier (2 conv layers of 16 and 32 channels + 1 hidden layer, trained
here for 3 epochs on the 60,000 training images; cached in the temp folder) judges 1,000
samples per model:

- confident share: the share of samples it assigns to the model's normal class with probability
  >= 0.9; the same share of the class's real training images is the reference;
- Frechet distance between the classifier's penultimate features of the samples and of the
  class's 1,000 test images (FID's formula, Heusel et al., 2017, in this classifier's feature
  space); two halves of the real test images give the noise floor.

    .venv/bin/python bench/sample_quality.py --classes 0 1 7 [--threads 2]
    .venv/bin/python bench/sample_quality.py --bundles models/demo     # bundles already trained

Without --bundles it trains the default config (config.yaml) on each class, as
bench/one_class_auroc.py does.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from detector.bundle import load_bundle
from detector.model import VAE, to_model_input
from trainer.data import load_images, split_normal
from trainer.fit import fit_vae
from vaewatch.config import load_settings

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CONFIDENT = 0.9
N_SAMPLES = 1000


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int) -> Classifier:
    torch.manual_seed(0)
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    for epoch in range(epochs):
        order = torch.randperm(len(x_all))
        for start in range(0, len(order), 256):
            pick = order[start : start + 256]
            loss = nn.functional.cross_entropy(model(to_model_input(x_all[pick])), y_all[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"classifier epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f}")
    return model.eval()


@torch.inference_mode()
def judge(classifier: Classifier, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and penultimate features of float [0, 1] (or uint8) N x 784 images."""
    x = torch.as_tensor(pixels)
    x = to_model_input(x) if x.dtype == torch.uint8 else x.float()
    features = classifier.features(x)
    return torch.softmax(classifier.head(features), 1).numpy(), features.double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||m_a - m_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)), the square root through the
    symmetric form C_a^(1/2) C_b C_a^(1/2) so that only symmetric eigendecompositions are needed."""
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(cross, 0, None)).sum()
    spread = np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    return float(((mean_a - mean_b) ** 2).sum() + spread)


def confident_share(probabilities: np.ndarray, normal_class: int) -> float:
    return float(np.mean(probabilities[:, normal_class] >= CONFIDENT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--classes", type=int, nargs="+", default=[0, 1, 7])
    parser.add_argument("--bundles", type=Path, nargs="+", default=None)
    parser.add_argument("--classifier-epochs", type=int, default=3)
    parser.add_argument(
        "--classifier-cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "vaewatch-sample-quality-classifier.pt",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--set", action="append", default=[], help="config override k=v")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = load_settings(args.config, [*args.set, "train.progress=false"])
    train_set = load_images(settings.data, split="train")
    test_set = load_images(settings.data, split="test")

    classifier = Classifier()
    if args.classifier_cache.is_file():
        classifier.load_state_dict(torch.load(args.classifier_cache, weights_only=True))
        classifier.eval()
    else:
        classifier = train_classifier(train_set.images, train_set.labels, args.classifier_epochs)
        torch.save(classifier.state_dict(), args.classifier_cache)
    accuracy = float(np.mean(judge(classifier, test_set.images)[0].argmax(1) == test_set.labels))
    print(f"classifier test accuracy {accuracy:.3f}")

    models: list[tuple[int, VAE]] = []
    if args.bundles:
        for path in args.bundles:
            bundle = load_bundle(path)
            models.append((int(bundle.metadata["data"]["normal_classes"][0]), bundle.model))
    else:
        for c in args.classes:
            data = settings.data.model_copy(update={"normal_classes": (c,)})
            split = split_normal(train_set, data, seed=settings.train.seed)
            started = time.perf_counter()
            fitted = fit_vae(
                split.train, split.val, model_config=settings.model, train=settings.train
            )
            print(f"class {c}: trained in {time.perf_counter() - started:.0f} s")
            models.append((c, fitted.model.cpu()))

    rows = []
    for c, model in models:
        real_test = test_set.images[test_set.labels == c]
        real_train = train_set.images[train_set.labels == c]
        real_features = judge(classifier, real_test)[1]
        half = len(real_features) // 2
        row = {
            "class": c,
            "real": confident_share(judge(classifier, real_train)[0], c),
            "real_fd": frechet_distance(real_features[:half], real_features[half:]),
        }
        for source in ("prior", "density"):
            if source == "density" and model.latent is None:
                continue
            generator = torch.Generator().manual_seed(0)
            with torch.inference_mode():
                pixels = model.sample(N_SAMPLES, generator=generator, prior=source == "prior")
            probabilities, features = judge(classifier, pixels.float().numpy())
            row[source] = confident_share(probabilities, c)
            row[f"{source}_fd"] = frechet_distance(features, real_features)
        rows.append(row)

    print(
        "\n| class | real images: confident share | prior: share | density: share | "
        "share / real (density) | FD prior | FD density | FD real half vs half |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        density = row.get("density", float("nan"))
        print(
            f"| {row['class']} {CLASS_NAMES[row['class']]} | {100 * row['real']:.1f} % | "
            f"{100 * row['prior']:.1f} % | {100 * density:.1f} % | {density / row['real']:.2f} | "
            f"{row['prior_fd']:.0f} | {row.get('density_fd', float('nan')):.0f} | "
            f"{row['real_fd']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
