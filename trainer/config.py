"""Settings of the trainer: data, optimisation, calibration."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DATASET_FORMS = "fashion-mnist, mnist, idx:DIR or npz:FILE"


class DataConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = "fashion-mnist"
    root: str = "data"
    normal_classes: tuple[int, ...] = Field((0,), min_length=1)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    download: bool = True

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value in ("fashion-mnist", "mnist") or value.startswith(("idx:", "npz:")):
            return value
        raise ValueError(f"unknown dataset {value!r}; expected {DATASET_FORMS}")


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(15, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    early_stopping_patience: int = Field(3, ge=0)
    device: str = "auto"
    seed: int = 0
    amp: bool = True
    progress: bool | Literal["auto"] = Field(
        "auto",
        description="Progress bar with the loss during each epoch: auto (only when stderr is a "
        "terminal; logs get one line per epoch), true (always) or false (never).",
    )


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target_fpr: float = Field(0.01, gt=0.0, lt=1.0)
    method: Literal["conformal", "f1"] = "conformal"
