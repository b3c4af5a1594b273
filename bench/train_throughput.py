"""Training throughput: the seed's DataLoader loop against vaewatch's in-memory trainer.

Both train the seed's MLP VAE (784-400-400-20, Bernoulli/BCE likelihood) with Adam, batch 128,
on the 60,000 Fashion-MNIST training images, in the same process, alternating epochs so that a
busy neighbour on a shared machine slows both alike. The seed's loop is its article's code with
one fix: inputs stay in [0, 1] (ToTensor only), because BCE rejects the article's [-1, 1].

    .venv/bin/python bench/train_throughput.py [--epochs 3] [--threads 2] [--device cpu]
        [--batch-sizes 128 512]

Prints images/s per epoch of each and the ratio of medians (target: >= 3x). The first batch size
is the seed's (128), the like-for-like comparison; others show vaewatch with larger batches.

With --whole it times whole processes instead (issue 21): the seed's loop for --epochs epochs as a
fresh Python process (its start-up, torchvision dataset and DataLoader included; the IDX files
are decompressed for torchvision beforehand, as the article's download is), then `vaewatch train`
as a fresh process (same model, likelihood, batch 128 and Adam settings, all ten classes,
--epochs epochs without early stopping, the default latent mixture, fused score, conformal
calibration, bundle and report, to a temporary folder), one after the other, --rounds times.
Prints each one's wall seconds, the ratio, and vaewatch's phases from its "train phases" log
line (start-up = the rest: interpreter, imports, settings). Each --variant is one more
`vaewatch train` per round, with its settings on top (the defaults' training against the one
before the drawn rotations and CPU bf16, say):

    .venv/bin/python bench/train_throughput.py --whole [--epochs 5] [--threads 2] [--rounds 1] \\
        [--variant vaewatch= --variant "before=train.transform_rotations=3;train.amp=false"]
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn, optim
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

# vaewatch's modules are imported where used, so that the --whole seed process imports what the
# seed's script does (torch, torchvision) and no more.
REPO = Path(__file__).resolve().parent.parent


class SeedVAE(nn.Module):
    """The article's model, as written."""

    def __init__(self, input_dim: int = 784, hidden_dim: int = 400, latent_dim: int = 20):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
        )
        self.fc_mu = nn.Linear(hidden_dim, latent_dim)
        self.fc_logvar = nn.Linear(hidden_dim, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, input_dim),
            nn.Sigmoid(),
        )

    def forward(self, x):
        enc = self.encoder(x)
        mu, logvar = self.fc_mu(enc), self.fc_logvar(enc)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar


def seed_loss(recon_x, x, mu, logvar):
    bce = nn.functional.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def torchvision_root(folder: Path) -> Path:
    """torchvision wants uncompressed IDX files under ROOT/FashionMNIST/raw."""
    from trainer.data import DEBIAN_FASHION_MNIST

    raw = folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"):
        with gzip.open(gz) as source, (raw / gz.name[:-3]).open("wb") as target:
            shutil.copyfileobj(source, target)
    return folder


def seed_epoch(model, optimizer, loader, device) -> float:
    """One epoch of the article's loop; returns images/s."""
    model.train()
    started = time.perf_counter()
    seen = 0
    for data, _ in loader:
        data = data.to(device)
        optimizer.zero_grad()
        recon_batch, mu, logvar = model(data.view(-1, 784))
        loss = seed_loss(recon_batch, data, mu, logvar)
        loss.backward()
        loss.item()  # the article accumulates train_loss += loss.item() every batch
        optimizer.step()
        seen += len(data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def seed_process(root: Path, epochs: int, device: torch.device) -> None:
    """The seed's script as one process: dataset, loader, model, `epochs` epochs."""
    dataset = datasets.FashionMNIST(
        str(root), train=True, transform=transforms.ToTensor(), download=False
    )
    loader = DataLoader(dataset=dataset, batch_size=128, shuffle=True)
    model = SeedVAE().to(device)
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        seed_epoch(model, optimizer, loader, device)


# `vaewatch train` configured as the seed's model and optimiser, on all ten classes.
WHOLE_SETTINGS = [
    "data.normal_classes=[0,1,2,3,4,5,6,7,8,9]",
    "data.download=false",
    "model.kind=mlp",
    "model.mlp_hidden=[400,400]",
    "model.latent_dim=20",
    "model.likelihood=bernoulli",
    "train.batch_size=128",
    "train.lr=0.001",
    "train.weight_decay=0",
    "train.early_stopping_patience=0",
    "train.progress=false",
]
_PHASES = re.compile(r"train phases \(s\): (.*)$", re.MULTILINE)


def _phases(log: str) -> dict[str, float]:
    """Seconds per phase from vaewatch train's "train phases" log line."""
    found = _PHASES.search(log)
    parts = found.group(1).split(", ") if found else []
    return {name: float(value) for name, value in (part.rsplit(" ", 1) for part in parts)}


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of a whole process, and its stderr."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{command[:4]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, done.stderr


def whole(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if args.threads:  # both processes: torch's and OpenMP's threads
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    temp = Path(tempfile.mkdtemp())
    root = torchvision_root(temp / "seed")
    here = [sys.executable, __file__, "--epochs", str(args.epochs), "--device", args.device]
    seed_command = [*here, "--seed-process", str(root)]
    if args.threads:
        seed_command += ["--threads", str(args.threads)]
    settings = [*WHOLE_SETTINGS, f"train.epochs={args.epochs}", f"train.device={args.device}"]
    from one_class_auroc import parse_variant  # bench/ is on sys.path: this script's folder

    variants = dict(parse_variant(v) for v in args.variant or ["vaewatch="])
    commands = {}
    for name, overrides in variants.items():
        commands[name] = [sys.executable, "-m", "vaewatch.cli", "--log-level", "INFO"]
        for setting in [*settings, *overrides]:
            commands[name] += ["--set", setting]
    seconds: dict[str, list[float]] = {"seed loop": [], **{name: [] for name in variants}}
    for round_ in range(1, args.rounds + 1):
        took, _ = timed(seed_command, env)
        seconds["seed loop"].append(took)
        line = f"round {round_}: seed loop {took:.1f} s"
        for name, command in commands.items():
            took, log = timed([*command, "train", "--out", str(temp / f"{name}{round_}")], env)
            seconds[name].append(took)
            phases = _phases(log)
            rest = took - sum(phases.values())
            breakdown = ", ".join(f"{phase} {value:.1f}" for phase, value in phases.items())
            line += (
                f"; {name} {took:.1f} s ({seconds['seed loop'][-1] / took:.2f}x; phases: "
                f"{breakdown}, start-up and the rest {rest:.1f})"
            )
        print(line, flush=True)
    shutil.rmtree(temp)
    seed = statistics.median(seconds["seed loop"])
    print(
        f"\nwhole processes, {args.epochs} epochs, device {args.device}, threads "
        f"{args.threads or 'default'}, median of {args.rounds}:"
    )
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  {name:>20}: {median:6.1f} s  ratio {seed / median:.2f}x")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--whole", action="store_true", help="whole processes side by side")
    parser.add_argument("--rounds", type=int, default=1, help="with --whole: repetitions")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="with --whole: NAME=key=value;key=value settings on top of the seed's model "
        "(repeatable; default: one run of the defaults, named vaewatch)",
    )
    parser.add_argument("--seed-process", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.seed_process:
        seed_process(args.seed_process, args.epochs, device)
        return 0
    if args.whole:
        return whole(args)
    from detector.config import ModelConfig
    from trainer.config import DataConfig, TrainConfig
    from trainer.data import load_images
    from trainer.fit import fit_vae

    temp = Path(tempfile.mkdtemp())
    dataset = datasets.FashionMNIST(
        str(torchvision_root(temp)), train=True, transform=transforms.ToTensor(), download=False
    )
    loader = DataLoader(dataset=dataset, batch_size=128, shuffle=True)
    seed_model = SeedVAE().to(device)
    seed_optimizer = optim.Adam(seed_model.parameters(), lr=1e-3)

    data = DataConfig(download=False)
    train_images = load_images(data, split="train").images
    val_images = load_images(data, split="test").images[:1000]
    model_config = ModelConfig(
        kind="mlp", mlp_hidden=(400, 400), latent_dim=20, likelihood="bernoulli"
    )
    trains = {
        size: TrainConfig(
            epochs=1, batch_size=size, lr=1e-3, weight_decay=0.0, device=args.device, progress=False
        )
        for size in args.batch_sizes
    }

    seed_rates: list[float] = []
    our_rates: dict[int, list[float]] = {size: [] for size in trains}
    for epoch in range(args.epochs):
        seed_rates.append(seed_epoch(seed_model, seed_optimizer, loader, device))
        line = f"epoch {epoch + 1}: seed loop (batch 128) {seed_rates[-1]:6.0f} images/s"
        for size, train in trains.items():
            # One fresh 1-epoch fit per round keeps the loops interleaved; fit_vae times only its
            # optimisation pass, as seed_epoch does.
            fitted = fit_vae(train_images, val_images, model_config=model_config, train=train)
            our_rates[size].append(fitted.history[0].images_per_s)
            line += f" | vaewatch batch {size} {our_rates[size][-1]:6.0f} images/s"
        print(line, flush=True)
    shutil.rmtree(temp)
    seed_median = statistics.median(seed_rates)
    print(
        f"\ndevice {device}, {torch.get_num_threads()} torch threads, {args.epochs} epochs each, "
        f"median images/s (s per 60k-image epoch):"
    )
    print(f"  seed DataLoader loop, batch 128: {seed_median:7.0f} ({60000 / seed_median:5.1f} s)")
    for size, rates in our_rates.items():
        median = statistics.median(rates)
        print(
            f"  vaewatch in-memory, batch {size:4d}: {median:7.0f} ({60000 / median:5.1f} s)  "
            f"ratio {median / seed_median:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
