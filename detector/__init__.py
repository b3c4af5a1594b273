"""The VAE, its anomaly score and the model bundle. Imports neither Kafka nor training code."""

from detector.bundle import Bundle, BundleError, load_bundle, save_bundle
from detector.calibration import Calibration
from detector.config import ModelConfig
from detector.latent import LatentDensity
from detector.model import VAE
from detector.scorer import (
    Detector,
    DeviceError,
    PendingScores,
    Scores,
    as_image_batch,
    resolve_device,
)

__all__ = [
    "VAE",
    "Bundle",
    "BundleError",
    "Calibration",
    "Detector",
    "DeviceError",
    "LatentDensity",
    "ModelConfig",
    "PendingScores",
    "Scores",
    "as_image_batch",
    "load_bundle",
    "resolve_device",
    "save_bundle",
]
