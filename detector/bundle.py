"""The model bundle: one directory that holds everything a scorer needs, verified on load.

bundle.json               model config, calibration summary, version, file digests, metadata
model.safetensors         weights (no pickle)
calibration.safetensors   sorted calibration scores
report/                   pictures and history written by the trainer (not needed to score)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from detector.calibration import Calibration
from detector.config import ModelConfig
from detector.model import VAE

FORMAT_VERSION = 1
MANIFEST = "bundle.json"
WEIGHTS = "model.safetensors"
CALIBRATION = "calibration.safetensors"


class BundleError(Exception):
    """A bundle is missing, corrupt or does not match its manifest. The message is one line."""


@dataclass
class Bundle:
    model: VAE
    calibration: Calibration
    version: str
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _content_version(
    config: dict[str, Any], calibration: dict[str, Any], digests: dict[str, str]
) -> str:
    """Hash of everything that decides a score and a decision: config, calibration, file digests."""
    identity = json.dumps(
        {"config": config, "calibration": calibration, "files": digests}, sort_keys=True
    )
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def save_bundle(
    path: str | Path,
    *,
    model: VAE,
    calibration: Calibration,
    metadata: dict[str, Any] | None = None,
) -> Bundle:
    """Write model, calibration and manifest into `path`; returns the bundle with its version.

    The version is a content hash of the weights, the model config and the calibration, so two
    bundles with the same version score every image the same way.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_torch(state, str(path / WEIGHTS))
    save_numpy({"scores": calibration.scores.astype(np.float64)}, str(path / CALIBRATION))
    digests = {name: _sha256(path / name) for name in (WEIGHTS, CALIBRATION)}
    config = model.config.model_dump(mode="json")
    calibration_summary = {
        "threshold": float(calibration.threshold),
        "target_fpr": float(calibration.target_fpr),
        "method": calibration.method,
        "n": calibration.n,
    }
    version = _content_version(config, calibration_summary, digests)
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_version": version,
        "model_config": config,
        "calibration": calibration_summary,
        "files": digests,
        "metadata": metadata or {},
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Bundle(model, calibration, version, metadata or {}, path)


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: no model bundle here (train one with `vaewatch train --out`)")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing; {path} is not a vaewatch model bundle")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: unsupported bundle format "
            f"{manifest.get('format_version') if isinstance(manifest, dict) else None!r}, "
            f"expected {FORMAT_VERSION}"
        )
    for key in ("model_version", "model_config", "calibration", "files"):
        if key not in manifest:
            raise BundleError(f"{manifest_path}: missing key {key!r}")
    for key in ("model_config", "calibration", "files"):
        if not isinstance(manifest[key], dict):
            raise BundleError(f"{manifest_path}: {key!r} must be a mapping")
    return manifest


def _verify_files(path: Path, digests: dict[str, str]) -> None:
    for name in (WEIGHTS, CALIBRATION):
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: missing from the bundle")
        if _sha256(file) != digests.get(name):
            raise BundleError(f"{file}: contents do not match the digest in {MANIFEST} (corrupt?)")


def load_bundle(path: str | Path, *, map_location: str | torch.device = "cpu") -> Bundle:
    """Read and verify a bundle: manifest, file digests, config, weight shapes, calibration."""
    path = Path(path)
    manifest = _read_manifest(path)
    _verify_files(path, manifest["files"])
    # The version is a hash of the config and calibration summary too, so an edited manifest
    # (say a changed beta or threshold, which the weights alone would not reveal) is caught here.
    expected = _content_version(
        manifest["model_config"], manifest["calibration"], manifest["files"]
    )
    if manifest["model_version"] != expected:
        raise BundleError(
            f"{path / MANIFEST}: model_config or calibration were changed after the bundle was "
            f"written (version {manifest['model_version']!r} does not match its contents)"
        )
    try:
        config = ModelConfig.model_validate(manifest["model_config"])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{path / MANIFEST}: model_config.{where}: {first['msg']}") from None
    model = VAE(config)
    try:
        state = load_torch(str(path / WEIGHTS), device=str(map_location))
        model.load_state_dict(state, strict=True)
        scores = load_numpy(str(path / CALIBRATION))["scores"]
    except (SafetensorError, RuntimeError, KeyError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{path}: weights do not match the model config ({message})") from None
    summary = manifest["calibration"]
    if len(scores) != summary.get("n"):
        raise BundleError(f"{path / CALIBRATION}: {len(scores)} scores, manifest says {summary}")
    try:
        calibration = Calibration(
            threshold=float(summary["threshold"]),
            target_fpr=float(summary["target_fpr"]),
            method=str(summary["method"]),
            scores=scores,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path / MANIFEST}: bad calibration ({exc})") from None
    model.eval()
    return Bundle(model, calibration, manifest["model_version"], manifest.get("metadata", {}), path)
