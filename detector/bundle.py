"""The model bundle: one directory that holds everything a scorer needs, verified on load.

bundle.json               model config, calibration summary (with the precision it was computed
                          in and the other precisions checked against it), preprocessing (how an
                          image file becomes the model's input), version, file digests, metadata
model.safetensors         weights (no pickle)
calibration.safetensors   sorted calibration scores
report/                   pictures and history written by the trainer (not needed to score)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from detector.calibration import Calibration
from detector.config import MODEL_CONFIG_BEFORE_LATENT, ModelConfig
from detector.model import VAE
from detector.preprocess import LEGACY_PREPROCESSING, Preprocessing

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
    # Bundles written before it was recorded take 28 x 28 images only, as they did.
    preprocessing: Preprocessing = LEGACY_PREPROCESSING


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _content_version(
    config: dict[str, Any],
    calibration: dict[str, Any],
    digests: dict[str, str],
    preprocessing: dict[str, Any] | None = None,
) -> str:
    """Hash of everything that decides a score and a decision: config, calibration, file digests,
    and the preprocessing of image files (absent from older bundles, whose versions stay)."""
    identity: dict[str, Any] = {"config": config, "calibration": calibration, "files": digests}
    if preprocessing is not None:
        identity["preprocessing"] = preprocessing
    identity_text = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(identity_text.encode()).hexdigest()[:12]


def save_bundle(
    path: str | Path,
    *,
    model: VAE,
    calibration: Calibration,
    metadata: dict[str, Any] | None = None,
    preprocessing: Preprocessing | None = None,
) -> Bundle:
    """Write model, calibration and manifest into `path`; returns the bundle with its version.

    The version is a content hash of the weights, the model config, the calibration and the
    preprocessing, so two bundles with the same version score every image the same way. Without
    `preprocessing` the bundle takes 28 x 28 images only, as bundles written before it did.
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
        "precision": calibration.precision,
        "precision_checks": calibration.precision_checks,
    }
    recorded = preprocessing.model_dump(mode="json") if preprocessing is not None else None
    version = _content_version(config, calibration_summary, digests, recorded)
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_version": version,
        "model_config": config,
        "calibration": calibration_summary,
        **({"preprocessing": recorded} if recorded is not None else {}),
        "files": digests,
        "metadata": metadata or {},
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Bundle(
        model, calibration, version, metadata or {}, path, preprocessing or LEGACY_PREPROCESSING
    )


def read_manifest(path: Path) -> dict[str, Any]:
    """The bundle's manifest (bundle.json), checked for its format and keys, without the
    weights; a BundleError names what is wrong."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: no model bundle here (train one with `vaewatch train --out`)")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing; {path} is not a vaewatch model bundle")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise BundleError(f"{manifest_path}: nested too deeply to be a bundle manifest") from None
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


def _check_weights_fit(weights: Path, config: ModelConfig) -> None:
    """Compare the tensors `config` needs with the weights file's header before building the
    model, so an absurd config (say model.mlp_hidden [10**9]) is an error, not an allocation of
    gigabytes. The config's model is built on the meta device: shapes only, no memory."""
    try:
        with torch.device("meta"):
            needed = {k: tuple(v.shape) for k, v in VAE(config).state_dict().items()}
    except (RuntimeError, ValueError, OverflowError, TypeError) as exc:
        raise BundleError(
            f"{weights.parent / MANIFEST}: model_config cannot be built ({_first_line(exc)})"
        ) from None
    try:
        with safe_open(str(weights), framework="numpy") as stored:
            found = {k: tuple(stored.get_slice(k).get_shape()) for k in stored.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(
            f"{weights}: not a readable safetensors file ({_first_line(exc)})"
        ) from None
    missing = sorted(set(needed) - set(found))
    unexpected = sorted(set(found) - set(needed))
    wrong = [k for k in needed if k in found and needed[k] != found[k]]
    if missing or unexpected or wrong:
        if wrong:
            name = wrong[0]
            detail = f"{name} is {list(found[name])} in the file, the config needs "
            detail += str(list(needed[name]))
        elif missing:
            detail = f"{len(missing)} tensors missing, e.g. {missing[0]}"
        else:
            detail = f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]}"
        raise BundleError(f"{weights.parent}: weights do not match the model config ({detail})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_bundle(path: str | Path, *, map_location: str | torch.device = "cpu") -> Bundle:
    """Read and verify a bundle: manifest, file digests, config, weight shapes, calibration."""
    path = Path(path)
    manifest = read_manifest(path)
    _verify_files(path, manifest["files"])
    # The version is a hash of the config and calibration summary too, so an edited manifest
    # (say a changed beta or threshold, which the weights alone would not reveal) is caught here.
    expected = _content_version(
        manifest["model_config"],
        manifest["calibration"],
        manifest["files"],
        manifest.get("preprocessing"),
    )
    if manifest["model_version"] != expected:
        raise BundleError(
            f"{path / MANIFEST}: model_config or calibration were changed after the bundle was "
            f"written (version {manifest['model_version']!r} does not match its contents)"
        )
    try:
        # Keys a bundle lacks are settings added after it was written: take the values that
        # keep its behaviour, not today's defaults (which would expect weights it does not have).
        config = ModelConfig.model_validate(
            {**MODEL_CONFIG_BEFORE_LATENT, **manifest["model_config"]}
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{path / MANIFEST}: model_config.{where}: {first['msg']}") from None
    _check_weights_fit(path / WEIGHTS, config)
    model = VAE(config)
    try:
        state = load_torch(str(path / WEIGHTS), device=str(map_location))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, KeyError) as exc:
        raise BundleError(
            f"{path}: weights do not match the model config ({_first_line(exc)})"
        ) from None
    try:
        scores = load_numpy(str(path / CALIBRATION))["scores"]
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise BundleError(
            f"{path / CALIBRATION}: not a readable calibration file ({_first_line(exc)})"
        ) from None
    summary = manifest["calibration"]
    if len(scores) != summary.get("n"):
        raise BundleError(f"{path / CALIBRATION}: {len(scores)} scores, manifest says {summary}")
    try:
        calibration = Calibration(
            threshold=float(summary["threshold"]),
            target_fpr=float(summary["target_fpr"]),
            method=str(summary["method"]),
            scores=scores,
            # Bundles written before issue 21 lack both: fp32, nothing else checked.
            precision=str(summary.get("precision", "fp32")),
            precision_checks=dict(summary.get("precision_checks", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path / MANIFEST}: bad calibration ({exc})") from None
    for name in ("threshold", "target_fpr"):
        value = getattr(calibration, name)
        if not math.isfinite(value):
            # A NaN threshold flags nothing (every comparison is false): refuse it.
            raise BundleError(f"{path / MANIFEST}: calibration {name} is {value!r}, not a number")
    model.eval()
    return Bundle(
        model,
        calibration,
        manifest["model_version"],
        manifest.get("metadata", {}),
        path,
        _preprocessing(path, manifest.get("preprocessing")),
    )


def _preprocessing(path: Path, recorded: Any) -> Preprocessing:
    if recorded is None:
        return LEGACY_PREPROCESSING
    try:
        return Preprocessing.model_validate(recorded)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{path / MANIFEST}: preprocessing.{where}: {first['msg']}") from None
