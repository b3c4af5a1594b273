"""One typed, validated settings object: config.yaml, then environment, then --set overrides.

Environment variables map onto keys as VAEWATCH_<SECTION>__<KEY> (for containers), e.g.
VAEWATCH_STREAM__BOOTSTRAP_SERVERS=kafka:9092. Values of overrides and environment variables are
YAML, so `--set "data.normal_classes=[3]"` gives a list and `--set train.amp=false` a bool.
Secret settings (SecretStr fields, e.g. stream.sasl_password) are the exception: taken verbatim
(`hunter2 #2024`, `null`, `123456` stay those characters) and never echoed in an error.
"""

from __future__ import annotations

import functools
import os
import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretBytes, SecretStr, ValidationError

from detector.config import DetectorSettings, ModelConfig
from detector.preprocess import ImageSettings
from serve.config import ServeConfig
from streams.config import MetricsConfig, StreamConfig
from streams.lifecycle.config import LifecycleConfig
from trainer.config import CalibrationConfig, DataConfig, TrainConfig

ENV_PREFIX = "VAEWATCH_"


class ConfigError(Exception):
    """A settings file, override or value is wrong. The message is one line naming the key."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    data: DataConfig = Field(
        default_factory=DataConfig,
        description="Where the images come from and which classes are normal (vaewatch train, "
        "evaluate, produce).",
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="Architecture and likelihood of the VAE that vaewatch train builds; saved in "
        "the model bundle, which is what scoring uses.",
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="Optimisation of vaewatch train."
    )
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig,
        description="How vaewatch train sets the alert threshold on held-out normal images.",
    )
    images: ImageSettings = Field(
        default_factory=ImageSettings,
        description="How image files (a folder:DIR data set, vaewatch score's files, the "
        "image codec's records, the console's uploads) become the model's 28 x 28 input. "
        "vaewatch train records the preprocessing keys in the bundle, and everything that "
        "scores with the bundle applies its record, not these; the limits and threads apply "
        "wherever files are decoded (docs/bundle.md, preprocessing).",
    )
    detector: DetectorSettings = Field(
        default_factory=DetectorSettings,
        description="Where and in what batches a loaded model scores (vaewatch score, evaluate, "
        "the worker).",
    )
    stream: StreamConfig = Field(
        default_factory=StreamConfig,
        description="The streaming worker (vaewatch worker, demo): Kafka topics and clients, "
        "micro-batching, CPU scoring.",
    )
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig,
        description="The worker's HTTP endpoint for Prometheus metrics, /healthz and /readyz.",
    )
    serve: ServeConfig = Field(
        default_factory=ServeConfig,
        description="The HTTP service vaewatch serve: where it listens, its limits, its "
        "micro-batching.",
    )
    lifecycle: LifecycleConfig = Field(
        default_factory=LifecycleConfig,
        description="The model's lifecycle in a running worker: hot reload of the --model path, "
        "shadow scoring of a candidate, score-drift windows (docs/lifecycle.md).",
    )


@functools.cache
def secret_keys() -> frozenset[str]:
    """'section.key' of every secret setting (SecretStr/SecretBytes, optional or not)."""
    keys = set()
    for section, section_field in Settings.model_fields.items():
        for name, field in section_field.annotation.model_fields.items():  # type: ignore[union-attr]
            kinds = typing.get_args(field.annotation) or (field.annotation,)
            if any(kind in (SecretStr, SecretBytes) for kind in kinds):
                keys.add(f"{section}.{name}")
    return frozenset(keys)


def _parse_value(key: str, text: str) -> Any:
    """A YAML value; the text is not echoed in the error (it may be a mistyped secret's)."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: value is not valid YAML ({exc.problem})") from None


def _apply(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{source}: key {key!r} must look like section.key")
    section, name = parts
    if section not in Settings.model_fields:
        known = ", ".join(Settings.model_fields)
        raise ConfigError(f"{source}: unknown section {section!r} in {key!r} (known: {known})")
    current = tree.get(section)
    if current is None:
        current = tree[section] = {}
    if not isinstance(current, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping")
    current[name] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'section.key=value' -> ('section.key', YAML value)."""
    key, sep, raw = text.partition("=")
    if not sep:
        # Only the key-like start is echoed: `stream.sasl_password:hunter2` is a typo'd secret.
        shown = re.match(r"[\w.-]*", text.strip()).group()  # type: ignore[union-attr]
        raise ConfigError(f"--set {shown!r}: expected section.key=value")
    key = key.strip()
    return key, raw if key in secret_keys() else _parse_value(key, raw)


def _env_overrides(env: Mapping[str, str]) -> Iterable[tuple[str, Any]]:
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        dotted = f"{section}.{key}"
        yield dotted, raw if dotted in secret_keys() else _parse_value(name, raw)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", exc)
        raise ConfigError(f"{path}:{where}: not valid YAML ({problem})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return loaded


def _field_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The leading part of a pydantic error location that names settings fields: without the
    member tag that a union's error adds (train.amp.bool) and anything after it."""
    model: Any = Settings
    path = []
    for part in loc:
        fields = (
            model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        )
        if part not in fields:
            break
        path.append(part)
        model = fields[part].annotation
    return tuple(path)


def _first_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The first error, or for a value that fits none of a union's forms (true, false or
    'auto'), one error naming the field and what each form wants."""
    first = errors[0]
    field = _field_path(first["loc"])
    forms = [e for e in errors if _field_path(e["loc"]) == field]
    if len(forms) > 1 and field and len(field) < len(first["loc"]):
        return {**first, "loc": field, "msg": "; or ".join(e["msg"] for e in forms)}
    return first


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    if key in secret_keys():
        return f"{key}: {error['msg']} (value not shown: it is a secret; quote it in YAML files)"
    if isinstance(error.get("input"), dict):  # a whole section: it may hold a secret
        return f"{key}: {error['msg']}"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def load_settings(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings. Later sources win: file < environment < overrides."""
    tree: dict[str, Any] = _read_file(Path(path)) if path is not None else {}
    source = str(path) if path is not None else "config"
    for key, value in _env_overrides(os.environ if env is None else env):
        _apply(tree, key, value, "environment")
    for text in overrides:
        key, value = parse_override(text)
        _apply(tree, key, value, "--set")
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(_first_error(exc.errors()))}") from None
