"""Training: seeded determinism, best-epoch weights, early stopping; and the integration test on
real Fashion-MNIST (the `trained_bundle` fixture): AUROC well above chance, FPR near target."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from detector import Detector, load_bundle
from detector.config import ModelConfig
from tests.fixtures_model import CPU, SMALL_BUNDLE_NORMAL_CLASS
from trainer import fit
from trainer.config import CalibrationConfig, DataConfig, TrainConfig
from trainer.evaluate import auroc
from trainer.fit import fit_vae, score_images, train_bundle

TINY = ModelConfig(kind="mlp", mlp_hidden=(32,), latent_dim=4)


@pytest.fixture(scope="module")
def tiny_data(fashion_mnist) -> tuple[np.ndarray, np.ndarray]:
    normal = fashion_mnist.train.images[fashion_mnist.train.labels == 1]
    return normal[:400], normal[400:500]


def _train(**changes) -> TrainConfig:
    return TrainConfig(
        **{"epochs": 3, "batch_size": 50, "progress": False, "device": "cpu"} | changes
    )


def test_same_seed_same_weights(tiny_data) -> None:
    first = fit_vae(*tiny_data, model_config=TINY, train=_train())
    second = fit_vae(*tiny_data, model_config=TINY, train=_train())
    other = fit_vae(*tiny_data, model_config=TINY, train=_train(seed=1))
    for (name, a), b in zip(
        first.model.state_dict().items(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    other_weights = other.model.state_dict().values()
    assert any(
        not torch.equal(a, c)
        for a, c in zip(first.model.state_dict().values(), other_weights, strict=True)
    )


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_on_cuda_and_on_cpus_with_native_bf16(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(fit, "native_bf16", lambda: native)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [fit.bf16_autocast(amp, cuda) for amp in ("auto", True, False)] == [True, True, False]
    assert [fit.bf16_autocast(amp, cpu) for amp in ("auto", True, False)] == [native, True, False]
    assert not fit.bf16_autocast("auto", torch.device("mps"))


def test_training_in_bf16_on_the_cpu(tiny_data, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trainer.fit")
    bf16 = fit_vae(*tiny_data, model_config=TINY, train=_train(amp=True))
    assert "bf16 autocast" in caplog.text
    fp32 = fit_vae(*tiny_data, model_config=TINY, train=_train(amp=False))
    assert all(np.isfinite(epoch.val_loss) for epoch in bf16.history)
    assert bf16.history[-1].val_loss < bf16.history[0].val_loss
    weights = zip(bf16.model.state_dict().values(), fp32.model.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in weights)


def test_history_and_best_epoch_weights(tiny_data) -> None:
    # A learning rate this high makes the validation loss bounce, so the best epoch is rarely
    # the last; the returned weights must be the best epoch's either way.
    result = fit_vae(*tiny_data, model_config=TINY, train=_train(epochs=6, lr=0.02))
    assert [r.epoch for r in result.history] == list(range(1, 7))
    assert all(r.seconds > 0 and r.images_per_s > 0 for r in result.history)
    assert set(result.phase_seconds) == {"epochs", "score statistics"}
    assert result.phase_seconds["epochs"] >= sum(r.seconds for r in result.history)
    best = min(result.history, key=lambda r: r.val_loss)
    assert result.best_epoch == best.epoch
    val_scores = score_images(
        result.model, tiny_data[1], device=torch.device("cpu"), elbo_only=True
    )
    val_loss = float(np.mean(val_scores))
    assert val_loss == pytest.approx(best.val_loss, rel=1e-5)


def test_early_stopping(tiny_data, monkeypatch) -> None:
    # Validation losses 5, 4, 6, 7, 8, ...: best at epoch 2, patience 2 stops after epoch 4.
    losses = iter([5.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    monkeypatch.setattr(fit, "score_images", lambda *a, **k: np.array([next(losses)]))
    result = fit_vae(
        *tiny_data, model_config=TINY, train=_train(epochs=7, early_stopping_patience=2)
    )
    assert result.stopped_early
    assert [r.val_loss for r in result.history] == [5.0, 4.0, 6.0, 7.0]
    assert result.best_epoch == 2


def test_no_early_stopping_when_patience_is_zero(tiny_data, monkeypatch) -> None:
    losses = iter([5.0, 6.0, 7.0, 8.0])
    monkeypatch.setattr(fit, "score_images", lambda *a, **k: np.array([next(losses)]))
    result = fit_vae(
        *tiny_data, model_config=TINY, train=_train(epochs=4, early_stopping_patience=0)
    )
    assert not result.stopped_early and len(result.history) == 4 and result.best_epoch == 1


def test_diverged_training_is_an_error(tiny_data, monkeypatch) -> None:
    monkeypatch.setattr(fit, "score_images", lambda *a, **k: np.array([np.nan]))
    with pytest.raises(fit.TrainingError, match="diverged"):
        fit_vae(*tiny_data, model_config=TINY, train=_train(epochs=2))


def test_trained_bundle_detects_other_classes(trained_bundle: Path, fashion_mnist) -> None:
    """Integration: trained on 2,700 real T-shirt images, scored on all 10,000 test images."""
    detector = Detector.from_bundle(trained_bundle, CPU)
    test = fashion_mnist.test
    result = detector.score(test.images)
    normal = test.labels == SMALL_BUNDLE_NORMAL_CLASS
    assert auroc(~normal, result.scores) > 0.85
    # Conformal threshold from 300 validation scores: the FPR on the 1,000 unseen normal test
    # images is Beta(3, 298)-distributed around 0.01 plus binomial noise: within 0.035 whp.
    fpr = float(np.mean(result.anomalous[normal]))
    assert fpr <= 0.035
    assert detector.calibration.target_fpr == 0.01


def test_bundle_holds_history_and_report(trained_bundle: Path) -> None:
    bundle = load_bundle(trained_bundle)
    assert bundle.metadata["n_val"] == 300 and bundle.metadata["n_train"] == 2700
    assert len(bundle.metadata["history"]) == bundle.metadata["train"]["epochs"]
    assert bundle.metadata["bf16_autocast"] is fit.bf16_autocast(
        bundle.metadata["train"]["amp"], torch.device("cpu")
    )
    report = trained_bundle / "report"
    for name in ("reconstructions.png", "samples.png", "scores.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    history = json.loads((report / "history.json").read_text())
    assert history[0]["epoch"] == 1 and "val_loss" in history[0]


def test_f1_calibration(tmp_path: Path, fashion_mnist, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trainer.fit")
    train = fashion_mnist.train
    pick = np.r_[np.flatnonzero(train.labels == 1)[:600], np.flatnonzero(train.labels == 3)[:200]]
    np.savez(tmp_path / "d.npz", x=train.images[pick], y=train.labels[pick])
    bundle = train_bundle(
        data=DataConfig(dataset=f"npz:{tmp_path / 'd.npz'}", normal_classes=(1,), val_fraction=0.2),
        model=TINY,
        train=_train(epochs=2),
        calibration=CalibrationConfig(method="f1"),
        out=tmp_path / "b",
    )
    assert bundle.calibration.method == "f1"
    assert bundle.calibration.n == 120
    # The phases' wall seconds, for bench/train_throughput.py --whole.
    (phases,) = [r.getMessage() for r in caplog.records if "train phases" in r.getMessage()]
    for name in ("data", "epochs", "score statistics", "calibration", "bundle", "report"):
        assert f"{name} " in phases


def test_too_few_images_for_the_latent_mixture_is_a_one_line_training_error(tiny_data) -> None:
    config = ModelConfig(kind="mlp", mlp_hidden=(32,), latent_dim=4, latent_components=16)
    with pytest.raises(fit.TrainingError, match="latent_components") as info:
        fit_vae(tiny_data[0][:100], tiny_data[1], model_config=config, train=_train(epochs=1))
    assert "\n" not in str(info.value)
