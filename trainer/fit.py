"""Fit a VAE on normal images, calibrate its threshold, and write the model bundle.

The whole training set is moved to the device once, as uint8, and each batch is gathered and
converted to [0, 1] floats there. There is no DataLoader and no per-image transform: those
dominate the seed's loop on a CPU (see bench/train_throughput.py for the measured ratio).
"""

from __future__ import annotations

import copy
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from detector.bundle import Bundle, save_bundle
from detector.calibration import Calibration
from detector.config import ModelConfig
from detector.model import VAE, to_model_input
from detector.preprocess import ImageSettings
from detector.scorer import native_bf16, resolve_device, score_batches
from trainer.calibrate import (
    CalibrationError,
    calibrate_f1,
    calibrate_threshold,
    validate_precisions,
)
from trainer.config import CalibrationConfig, DataConfig, TrainConfig
from trainer.data import ImageSet, load_images, normal_mask, split_normal, training_preprocessing
from trainer.latent import fit_score_statistics

log = logging.getLogger(__name__)

_SCORE_BATCH = 4096


class TrainingError(Exception):
    """Training could not produce a usable model (e.g. the loss diverged). One line."""


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float  # mean negative ELBO (sampled z) over the epoch's batches, nats/image
    val_loss: float  # mean negative ELBO at z = mu on validation images, nats/image
    seconds: float  # the optimisation pass only, without validation
    images_per_s: float


@dataclass
class FitResult:
    model: VAE  # the best epoch's weights, in eval mode
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    bf16_autocast: bool = False  # what train.amp came to on this device (`bf16_autocast`)
    # Wall seconds of "epochs" (optimisation and validation passes) and "score statistics"
    # (trainer.latent); train_bundle adds its own phases and logs them all.
    phase_seconds: dict[str, float] = field(default_factory=dict)


def score_images(
    model: VAE,
    images: torch.Tensor | np.ndarray,
    *,
    device: torch.device,
    elbo_only: bool = False,
) -> np.ndarray:
    """Deterministic anomaly scores (`VAE.score`) of uint8 N x 784 images, float64; with
    `elbo_only`, the negative ELBO at z = mu alone (what training minimises)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    was_training = model.training
    model.eval()
    if elbo_only:
        with torch.inference_mode():
            parts = [
                model.elbo_score(to_model_input(images[i : i + _SCORE_BATCH].to(device))).cpu()
                for i in range(0, len(images), _SCORE_BATCH)
            ]
        scores = torch.cat(parts).float() if parts else torch.empty(0)
    else:
        scores = score_batches(model, images, device=device, batch_size=_SCORE_BATCH)
    model.train(was_training)
    return scores.numpy().astype(np.float64)


def bf16_autocast(amp: bool | str, device: torch.device) -> bool:
    """Whether training autocasts to bf16 (`train.amp`): `auto` on CUDA, and on a CPU only where
    bf16 is native, since emulated bf16 is slower than fp32 there."""
    if device.type == "cuda":
        return amp is not False
    if device.type == "cpu":
        return amp is True or (amp == "auto" and native_bf16())
    return False


def transform_head_loss(
    model: VAE, x: torch.Tensor, features: torch.Tensor, *, rotations: int
) -> torch.Tensor:
    """Per image: the transform head's cross-entropy summed over all `transforms` rotations, or,
    with fewer `rotations` than the image has other rotations, an unbiased estimate of that sum:
    the image itself plus `rotations` others drawn at random without replacement, weighted up.
    `features`: the encoder's features of x (the unrotated images' pass is shared with the VAE)."""
    others = model.config.transforms - 1
    if rotations >= others:
        return -model.transform_log_probs(x, features).sum(dim=1)
    n = len(x)
    # Column j of a random permutation of 1..others per image: `rotations` distinct draws each.
    drawn = torch.rand(n, others, device=x.device).argsort(dim=1)[:, :rotations] + 1
    drawn = drawn.T.reshape(-1)
    rotated = model.rotate(x.repeat(rotations, 1), drawn)
    logits = model.transform_head(torch.cat([features, model.encoder(rotated)])).float()
    targets = torch.cat([torch.zeros(n, dtype=torch.long, device=x.device), drawn])
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return nll[:n] + others / rotations * nll[n:].view(rotations, n).sum(dim=0)


def _train_epoch(
    model: VAE,
    optimizer: torch.optim.Optimizer,
    x_train: torch.Tensor,
    order: torch.Tensor,
    train: TrainConfig,
    use_amp: bool,
    bar: tqdm,
) -> float:
    """One pass over the shuffled training images; returns the summed per-image loss."""
    device_type = x_train.device.type
    total = torch.zeros((), device=x_train.device)
    for b in range(bar.total):
        x = to_model_input(x_train[order[b * train.batch_size : (b + 1) * train.batch_size]])
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_amp):
            if model.transform_head is None:
                logits, mu, logvar = model(x)
            else:  # the forward pass, keeping the encoder's features of x for the head
                features = model.encoder(x)
                mu, logvar = model.fc_mu(features), model.fc_logvar(features)
                logits = model.decode(model.reparameterize(mu, logvar))
                head_loss = transform_head_loss(
                    model, x, features, rotations=train.transform_rotations
                ).mean()
        loss = model.loss(x, logits, mu, logvar).mean()
        if model.transform_head is not None:
            # Self-supervision (docs/model.md): tell the image's rotations apart.
            loss = loss + model.config.transform_loss_weight * head_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(x)
        bar.update()
        if not bar.disable and (b % 20 == 0 or b == bar.total - 1):
            # .item() waits for the device; every 20 batches is enough to watch the loss.
            bar.set_postfix(loss=f"{loss.item():.1f}")
    return float(total.item())


def fit_vae(
    train_images: np.ndarray,
    val_images: np.ndarray,
    *,
    model_config: ModelConfig,
    train: TrainConfig,
) -> FitResult:
    """Train with Adam on in-memory uint8 images; early stopping on the validation score mean;
    then fit the score statistics (trainer.latent) on the training images.

    Validation uses the deterministic negative ELBO (z = mu) rather than a sampled one: it does
    not jitter from epoch to epoch with the noise of sampling, so patience counts real stalls.
    """
    device = resolve_device(train.device)
    torch.manual_seed(train.seed)
    shuffle = torch.Generator(device="cpu").manual_seed(train.seed)
    model = VAE(model_config).to(device)
    # The fused kernel updates all parameters in one pass instead of a dozen elementwise ops per
    # tensor: markedly faster on the CPU (BENCHMARKS.md, "Choices made by measurement").
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=train.lr,
        weight_decay=train.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.epochs)
        if train.lr_schedule == "cosine"
        else None
    )
    use_amp = bf16_autocast(train.amp, device)
    x_train = torch.from_numpy(np.ascontiguousarray(train_images)).to(device)
    x_val = torch.from_numpy(np.ascontiguousarray(val_images)).to(device)
    n = len(x_train)
    batches = max(1, -(-n // train.batch_size))
    result = FitResult(model=model, bf16_autocast=use_amp)
    # A bar only on a terminal: in a log file or CI output its carriage returns become one long
    # line; the per-epoch log line below says the same once per epoch.
    show_progress = train.progress is True or (train.progress == "auto" and sys.stderr.isatty())
    best_val, best_state, stale = float("inf"), None, 0
    log.info(
        "training %s VAE (%s) on %d images, validating on %d, device %s%s",
        model_config.kind,
        model_config.likelihood,
        n,
        len(x_val),
        device,
        ", bf16 autocast" if use_amp else "",
    )
    epochs_started = time.perf_counter()
    for epoch in range(1, train.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=shuffle).to(device)
        started = time.perf_counter()
        bar = tqdm(
            total=batches,
            desc=f"epoch {epoch}/{train.epochs}",
            disable=not show_progress,
            leave=False,
            unit="batch",
        )
        with bar:
            total = _train_epoch(model, optimizer, x_train, order, train, use_amp, bar)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        if schedule is not None:
            schedule.step()
        train_loss = total / n
        val_loss = float(np.mean(score_images(model, x_val, device=device, elbo_only=True)))
        record = EpochRecord(epoch, train_loss, val_loss, seconds, n / seconds)
        result.history.append(record)
        log.info(
            "epoch %d/%d: train loss %.2f, val loss %.2f, %.1f s, %.0f images/s",
            epoch, train.epochs, train_loss, val_loss, seconds, record.images_per_s,
        )  # fmt: skip
        if not np.isfinite(val_loss):
            raise TrainingError(
                f"validation loss is {val_loss} at epoch {epoch}: training diverged "
                "(try a lower train.lr)"
            )
        if val_loss < best_val:
            best_val, stale, result.best_epoch = val_loss, 0, epoch
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if train.early_stopping_patience and stale >= train.early_stopping_patience:
                log.info("early stop: no better validation loss for %d epochs", stale)
                result.stopped_early = True
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    statistics_started = time.perf_counter()
    result.phase_seconds["epochs"] = statistics_started - epochs_started
    try:
        fit_score_statistics(model, train_images, device=device, seed=train.seed)
    except ValueError as exc:  # e.g. too few images for the latent mixture
        raise TrainingError(f"{exc} (lower model.latent_components)") from None
    result.phase_seconds["score statistics"] = time.perf_counter() - statistics_started
    return result


def _anomaly_images(images: ImageSet, data: DataConfig, n: int, seed: int) -> np.ndarray:
    """Up to n labelled training images outside the normal classes, for the F1 threshold."""
    if images.labels is None:
        return np.empty((0, images.images.shape[1]), np.uint8)
    others = images.images[~normal_mask(images, data.normal_classes)]
    pick = np.random.default_rng(seed + 1).permutation(len(others))[:n]
    return others[pick]


def calibrate(
    model: VAE,
    val_scores: np.ndarray,
    *,
    calibration: CalibrationConfig,
    anomalies: np.ndarray,
    device: torch.device,
) -> Calibration:
    """The calibration that `calibration.method` asks for."""
    if calibration.method == "conformal":
        return calibrate_threshold(val_scores, target_fpr=calibration.target_fpr)
    if len(anomalies) == 0:
        raise CalibrationError(
            "calibration.method=f1 needs labelled anomalies: the training data has no labelled "
            "images outside data.normal_classes (use calibration.method=conformal)"
        )
    anomaly_scores = score_images(model, anomalies, device=device)
    return calibrate_f1(val_scores, anomaly_scores, target_fpr=calibration.target_fpr)


def _json_config(config: Any) -> dict[str, Any]:
    return config.model_dump(mode="json")


def train_bundle(
    *,
    data: DataConfig,
    model: ModelConfig,
    train: TrainConfig,
    calibration: CalibrationConfig,
    out: Path,
    image_settings: ImageSettings | None = None,
) -> Bundle:
    """Load data, fit, calibrate on validation scores, and write bundle + report into `out`.
    Image files become the model's input by the preprocessing of `image_settings` (the settings'
    images section), which the bundle records.

    Logs the wall seconds of each phase at the end (bench/train_throughput.py --whole reads it).
    """
    out = Path(out)
    clock = time.perf_counter()
    image_settings = image_settings or ImageSettings()
    preprocessing = training_preprocessing(data, image_settings)
    images = load_images(data, split="train", decoding=image_settings.decoding(preprocessing))
    split = split_normal(images, data, seed=train.seed)
    phases = {"data": time.perf_counter() - clock}
    fitted = fit_vae(split.train, split.val, model_config=model, train=train)
    phases.update(fitted.phase_seconds)
    clock = time.perf_counter()
    device = resolve_device(train.device)
    fitted.model.to(device)
    val_scores = score_images(fitted.model, split.val, device=device)
    anomalies = (
        _anomaly_images(images, data, len(split.val), train.seed)
        if calibration.method == "f1"
        else np.empty((0, 784), np.uint8)
    )
    calib = calibrate(
        fitted.model, val_scores, calibration=calibration, anomalies=anomalies, device=device
    )
    # Which faster CPU precisions decide like fp32 at this threshold (`detector.precision: auto`
    # picks only those): the validation images scored again in each, on the CPU; int8's fixed
    # activation scales from the training images.
    fitted.model.cpu()
    calib = validate_precisions(
        fitted.model,
        split.val,
        calib,
        anomalies=anomalies if len(anomalies) else None,
        range_images=split.train,
    )
    history = [record.__dict__ for record in fitted.history]
    metadata = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": _json_config(data),
        "train": _json_config(train),
        "calibration": _json_config(calibration),
        "n_train": len(split.train),
        "n_val": len(split.val),
        "best_epoch": fitted.best_epoch,
        "stopped_early": fitted.stopped_early,
        "bf16_autocast": fitted.bf16_autocast,
        "history": history,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    phases["calibration"] = time.perf_counter() - clock
    clock = time.perf_counter()
    bundle = save_bundle(
        out, model=fitted.model, calibration=calib, metadata=metadata, preprocessing=preprocessing
    )
    phases["bundle"] = time.perf_counter() - clock
    log.info(
        "bundle %s written to %s: threshold %.2f (%s, target FPR %.3g, n=%d)",
        bundle.version, out, calib.threshold, calib.method, calib.target_fpr, calib.n,
    )  # fmt: skip
    clock = time.perf_counter()
    from trainer.report import write_training_report  # matplotlib only when a report is drawn

    write_training_report(
        out, model=fitted.model, calibration=calib, val_images=split.val, history=history
    )
    phases["report"] = time.perf_counter() - clock
    breakdown = ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items())
    log.info("train phases (s): %s", breakdown)
    return bundle
