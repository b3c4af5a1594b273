"""Settings of the trainer: data, optimisation, calibration."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DATASET_FORMS = "fashion-mnist, mnist, idx:DIR, npz:FILE or folder:DIR"


class DataConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = Field(
        "fashion-mnist",
        description="fashion-mnist (the torchvision root, else Debian's "
        "/usr/share/datasets/fashion-mnist, else a download), mnist (the torchvision "
        "root or a download), idx:DIR (MNIST-format IDX files), npz:FILE (array x: "
        "uint8 N x 28 x 28 or N x 784, optional y: labels) or folder:DIR (image files of any "
        "size: one subfolder per class, or a flat folder of normal images; a test/ subfolder "
        "is the test split; the images section says how they become 28 x 28).",
    )
    root: str = Field(
        "data", description="torchvision dataset root: looked in first, and where downloads go."
    )
    normal_classes: tuple[int | str, ...] = Field(
        (0,),
        min_length=1,
        description="Classes that are normal: training and calibration use only these; the others "
        "are anomalies when evaluating. Labels, or the names of a folder's class subfolders "
        "([good]); a flat folder is all normal.",
    )
    val_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="Share of the normal training images held out for early stopping and threshold "
        "calibration.",
    )
    download: bool = Field(
        True, description="Allow torchvision to download a dataset that is not found locally."
    )
    test_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="folder:DIR without a test/ subfolder: the share of its files held out as "
        "the test split (vaewatch evaluate), chosen by a hash of each file's path (the same files "
        "every run).",
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value in ("fashion-mnist", "mnist") or value.startswith(("idx:", "npz:", "folder:")):
            return value
        raise ValueError(f"unknown dataset {value!r}; expected {DATASET_FORMS}")


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(
        15, ge=1, description="Most epochs to train (early stopping may end sooner)."
    )
    batch_size: int = Field(
        128,
        ge=1,
        description="Images per optimisation step; larger batches train faster on a CPU "
        "(BENCHMARKS.md, training throughput).",
    )
    lr: float = Field(1e-3, gt=0.0, description="Adam's learning rate.")
    weight_decay: float = Field(1e-5, ge=0.0, description="Adam's L2 weight decay.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="Learning rate over the epochs: constant, or cosine (from lr down to zero at "
        "the last epoch, Loshchilov & Hutter's SGDR without restarts).",
    )
    transform_rotations: int = Field(
        1,
        ge=1,
        description="With a transform head (model.transforms): how many rotations of each image "
        "besides the image itself the head learns from per step, drawn at random each time (an "
        "unbiased estimate of its loss over all rotations). Each one costs an encoder pass; "
        "transforms - 1 or more trains on every rotation at every step, about 1.8x the time "
        "per epoch for the default conv model, at the same AUROC (BENCHMARKS.md, training "
        "throughput).",
    )
    early_stopping_patience: int = Field(
        3,
        ge=0,
        description="Stop after this many epochs without a better validation loss (0 = never stop "
        "early).",
    )
    device: str = Field(
        "auto", description="auto = CUDA when present, else the CPU; or cpu, cuda, cuda:1, ..."
    )
    seed: int = Field(
        0,
        description="Seed of the initial weights, the shuffling and the validation split: the same "
        "seed and data give the same model on the same kind of CPU (with amp auto, one with "
        "native bf16 trains in bf16 and one without in fp32).",
    )
    amp: bool | Literal["auto"] = Field(
        "auto",
        description="Mixed precision (bf16 autocast) in training: auto = on CUDA and on a CPU "
        "with native bf16 (AVX512-BF16 or AMX), where it is faster than fp32; true = on CUDA and "
        "on any CPU (one without native bf16 emulates it, slower); false = fp32 throughout.",
    )
    progress: bool | Literal["auto"] = Field(
        "auto",
        description="Progress bar with the loss during each epoch: auto (only when stderr is a "
        "terminal; logs get one line per epoch), true (always) or false (never).",
    )


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target_fpr: float = Field(
        0.01,
        gt=0.0,
        lt=1.0,
        description="The false-positive rate the threshold is set for on new normal images.",
    )
    method: Literal["conformal", "f1"] = Field(
        "conformal",
        description="conformal: split-conformal quantile of the held-out normal scores (FPR <= "
        "target in expectation). f1: the F1-optimal threshold, which needs labelled "
        "anomalies in the data.",
    )
