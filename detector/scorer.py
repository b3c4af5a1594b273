"""Scoring whole batches of uint8 images on the chosen device.

The hot path: the caller hands over an N x 784 uint8 array; on CUDA it is copied into a pinned
host buffer and sent to the GPU without blocking, converted to float there (4x fewer bytes over
PCIe than float32), scored under inference mode, and the scores come back through a pinned
buffer. `submit` returns at once on CUDA, so the caller can poll and decode the next batch while
the GPU works; `PendingScores.result()` waits for the copy back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from detector.bundle import Bundle, load_bundle
from detector.calibration import Calibration
from detector.config import IMAGE_PIXELS, DetectorSettings
from detector.model import VAE, to_model_input

_PINNED_SLOTS = 2  # one batch in flight on the GPU while the next one is being filled


class DeviceError(ValueError):
    """The configured device does not exist here. The message is one line."""


def resolve_device(name: str) -> torch.device:
    """`auto` means CUDA when present, else CPU; any other name is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device {name!r} is unknown (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r}: only {torch.cuda.device_count()} CUDA devices here")
    return device


def as_image_batch(images: np.ndarray) -> np.ndarray:
    """Check and flatten a batch of 28x28 uint8 images to a C-contiguous N x 784 array."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 0..255, got {images.dtype}")
    if images.ndim == 3 and images.shape[1:] == (28, 28):
        images = images.reshape(len(images), IMAGE_PIXELS)
    if images.ndim != 2 or images.shape[1] != IMAGE_PIXELS:
        raise ValueError(f"images must be N x 784 or N x 28 x 28, got shape {images.shape}")
    return np.ascontiguousarray(images)


@torch.inference_mode()
def score_batches(
    model: VAE, images: torch.Tensor, *, device: torch.device, batch_size: int
) -> torch.Tensor:
    """Deterministic scores of uint8 N x 784 images, `batch_size` at a time on `device`, as a
    float32 CPU tensor. The model must be in eval mode (dropout off)."""
    parts = [
        model.score(to_model_input(images[i : i + batch_size].to(device))).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(parts) if parts else torch.empty(0)


@dataclass(frozen=True)
class Scores:
    """Per-image results, aligned with the input rows."""

    scores: np.ndarray  # float32 anomaly scores (VAE.score, docs/model.md)
    p_values: np.ndarray  # float64 conformal p-values
    anomalous: np.ndarray  # bool, score > threshold

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def judged(cls, scores: np.ndarray, calibration: Calibration) -> Scores:
        """Raw scores with their p-values and decisions under `calibration`."""
        return cls(
            scores=scores,
            p_values=calibration.p_values(scores),
            anomalous=calibration.is_anomaly(scores),
        )


class PendingScores:
    """Scores still on their way back from the device; `result()` waits for them."""

    def __init__(self, calibration: Calibration, host: torch.Tensor, done: torch.cuda.Event | None):
        self._calibration = calibration
        self._host = host
        self._done = done

    def done(self) -> bool:
        """True once the scores are on the host, so `result()` will not wait."""
        return self._done is None or self._done.query()

    def result(self) -> Scores:
        if self._done is not None:
            self._done.synchronize()
        return Scores.judged(self._host.numpy().copy(), self._calibration)


class Detector:
    """A loaded model and its calibration, ready to score batches on one device."""

    def __init__(
        self,
        model: VAE,
        calibration: Calibration,
        *,
        version: str,
        device: str = "auto",
        max_batch_size: int = 8192,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.calibration = calibration
        self.version = version
        self.max_batch_size = max_batch_size
        self._pinned_in: list[torch.Tensor] = []
        self._slot_free: list[torch.cuda.Event | None] = []
        self._next_slot = 0
        if self.device.type == "cuda":
            self._pinned_in = [
                torch.empty((max_batch_size, IMAGE_PIXELS), dtype=torch.uint8).pin_memory()
                for _ in range(_PINNED_SLOTS)
            ]
            self._slot_free = [None] * _PINNED_SLOTS

    @classmethod
    def from_bundle(
        cls, bundle: str | Path | Bundle, settings: DetectorSettings | None = None
    ) -> Detector:
        """The one way to make a detector of a bundle (its directory, or one already loaded),
        scoring where and in the batches `settings` say (the `detector` section of the settings;
        its defaults when None)."""
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle)
        settings = settings or DetectorSettings()
        return cls(
            bundle.model,
            bundle.calibration,
            version=bundle.version,
            device=settings.device,
            max_batch_size=settings.max_batch_size,
        )

    @property
    def settings(self) -> DetectorSettings:
        """Where and in what batches this detector scores, with `auto` resolved: what another
        bundle needs to be loaded alike (a hot swap must not move to another device)."""
        return DetectorSettings(device=str(self.device), max_batch_size=self.max_batch_size)

    @property
    def threshold(self) -> float:
        return self.calibration.threshold

    @torch.inference_mode()
    def _score_on_device(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.score(to_model_input(images)).float()

    def submit(self, images: np.ndarray) -> PendingScores:
        """Start scoring a batch; on CUDA this returns before the GPU has finished."""
        images = as_image_batch(images)
        if self.device.type != "cuda":
            return PendingScores(self.calibration, self._score_cpu(images), None)
        return self._submit_cuda(images)

    def score(self, images: np.ndarray) -> Scores:
        """Score a batch of any size and wait for the result."""
        return self.submit(images).result()

    def _score_cpu(self, images: np.ndarray) -> torch.Tensor:
        return score_batches(
            self.model,
            torch.from_numpy(images),
            device=self.device,
            batch_size=self.max_batch_size,
        )

    def _submit_cuda(self, images: np.ndarray) -> PendingScores:
        host_out = torch.empty(len(images), dtype=torch.float32).pin_memory()
        for start in range(0, len(images), self.max_batch_size):
            chunk = images[start : start + self.max_batch_size]
            slot = self._next_slot
            self._next_slot = (slot + 1) % _PINNED_SLOTS
            if self._slot_free[slot] is not None:
                # The GPU may still be reading this pinned buffer from an earlier batch.
                self._slot_free[slot].synchronize()
            pinned = self._pinned_in[slot][: len(chunk)]
            pinned.numpy()[:] = chunk
            on_device = pinned.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            self._slot_free[slot] = copied
            scores = self._score_on_device(on_device)
            host_out[start : start + len(chunk)].copy_(scores, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingScores(self.calibration, host_out, done)
