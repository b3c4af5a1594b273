"""CPU scoring precision (issues 21 and 29): the prepared fp32 copy scores as the model does,
int8 and bf16 stay close to fp32 on real Fashion-MNIST images, the bundle records its precision,
`auto` resolves as documented (never int8 on CUDA; int8 on a CPU without bf16 where validated),
and a bad value is a one-line error. int8's batch-independence: tests/detector/test_int8.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from detector import scorer
from detector.bundle import MANIFEST, _content_version, load_bundle, save_bundle
from detector.calibration import Calibration
from detector.config import DetectorSettings, ModelConfig
from detector.int8 import activation_ranges
from detector.model import VAE
from detector.scorer import (
    Detector,
    DeviceError,
    PrecisionError,
    cpu_scoring_model,
    resolve_precision,
    score_batches,
)
from vaewatch.config import ConfigError, load_settings

CPU = torch.device("cpu")


def _fp32_model_scores(model: VAE, images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model.eval().score(torch.from_numpy(images).float() / 255.0).numpy()


def _calibration(**kwargs) -> Calibration:
    return Calibration(
        threshold=1.0, target_fpr=0.1, method="conformal", scores=np.linspace(0, 2, 30), **kwargs
    )


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_the_prepared_fp32_copy_scores_as_the_model_does(kind: str, fashion_mnist) -> None:
    """The rewrite (channels-last, the last transposed convolution as a matrix product and
    col2im, ReLUs in place) is exact up to float rounding; speed does not depend on the
    weights, so an untrained default model of each kind is enough."""
    torch.manual_seed(0)
    model = VAE(ModelConfig(kind=kind)).eval()
    images = fashion_mnist.test.images[:300]
    got = score_batches(model, torch.from_numpy(images), device=CPU, batch_size=1024).numpy()
    np.testing.assert_allclose(got, _fp32_model_scores(model, images), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("out_channels", [1, 3])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_folded_transposed_convolution_is_the_layer_it_replaces(out_channels, layout):
    """The decoder's last layer as a matrix product and col2im gives the transposed
    convolution's output (bias included) for either input layout and a few output channels."""
    torch.manual_seed(out_channels)
    layer = torch.nn.ConvTranspose2d(32, out_channels, 4, stride=2, padding=1).eval()
    x = torch.randn(5, 32, 14, 14).contiguous(memory_format=layout)
    with torch.inference_mode():
        got = scorer._FoldedTransposedConv(layer)(x)
        want = layer(x)
    assert got.shape == want.shape == (5, out_channels, 28, 28)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_prepared_copy_of_a_trained_bundle_scores_as_its_model(
    trained_bundle: Path, fashion_mnist
) -> None:
    """With a fitted latent mixture (its inverse factors computed once in the copy) and fitted
    score normalisation: the same scores up to float rounding."""
    model = load_bundle(trained_bundle).model
    images = fashion_mnist.test.images[:500]
    got = score_batches(model, torch.from_numpy(images), device=CPU, batch_size=256).numpy()
    np.testing.assert_allclose(got, _fp32_model_scores(model, images), rtol=1e-5, atol=1e-4)


def test_quantised_scores_are_close_to_fp32_on_real_images(trained_bundle: Path, fashion_mnist):
    """int8 and bf16 scores of 2,000 real test images: the same ranking and the same decisions
    at the calibrated threshold, up to a few images next to it."""
    bundle = load_bundle(trained_bundle)
    images = torch.from_numpy(fashion_mnist.test.images[:2000])
    fp32 = score_batches(bundle.model, images, device=CPU, batch_size=512).numpy()
    spread = np.subtract(*np.percentile(fp32, [75, 25]))
    threshold = bundle.calibration.threshold
    for precision in ("int8", "bf16"):
        got = score_batches(
            bundle.model,
            images,
            device=CPU,
            batch_size=512,
            precision=precision,
            int8_ranges=bundle.calibration.int8_ranges,
        ).numpy()
        difference = np.abs(got - fp32)
        assert np.median(difference) < 0.02 * spread, precision
        assert np.percentile(difference, 99) < 0.1 * spread, precision
        ranks = np.corrcoef(np.argsort(np.argsort(got)), np.argsort(np.argsort(fp32)))[0, 1]
        assert ranks > 0.999, precision
        flipped = (got > threshold) != (fp32 > threshold)
        # Decisions change only next to the threshold (how many depends on how many scores lie
        # there, which differs from bundle to bundle), never for an image far from it.
        assert np.all(np.abs(fp32[flipped] - threshold) < 0.05 * spread), precision
        assert np.mean(flipped) <= 0.01, precision


def test_the_prepared_copy_follows_the_weights() -> None:
    """A copy made for old weights is never used after they change in place."""
    torch.manual_seed(0)
    model = VAE(ModelConfig(kind="conv", conv_channels=(8, 16), latent_dim=4)).eval()
    images = torch.randint(0, 256, (16, 784), dtype=torch.uint8)
    before = score_batches(model, images, device=CPU, batch_size=16)
    assert cpu_scoring_model(model) is cpu_scoring_model(model)
    with torch.no_grad():
        model.decoder[0].bias.add_(0.5)
    after = score_batches(model, images, device=CPU, batch_size=16)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, model.score(images.float() / 255.0), rtol=1e-5, atol=1e-3)


def test_the_bundle_records_its_precision_and_checks(tmp_path: Path, fashion_mnist) -> None:
    from trainer.calibrate import calibrate_threshold, validate_precisions

    torch.manual_seed(0)
    model = VAE(ModelConfig(kind="mlp", mlp_hidden=(64,), latent_dim=4)).eval()
    normal = fashion_mnist.test.images[fashion_mnist.test.labels == 0][:300]
    others = fashion_mnist.test.images[fashion_mnist.test.labels != 0][:300]
    scores = score_batches(model, torch.from_numpy(normal), device=CPU, batch_size=300)
    calibration = calibrate_threshold(scores.numpy(), target_fpr=0.1)
    checked = validate_precisions(model, normal, calibration, anomalies=others)
    assert set(checked.precision_checks) == {"int8", "bf16"}
    assert {"fpr", "fpr_reference", "auroc", "auroc_reference", "passed"} <= set(
        checked.precision_checks["int8"]
    )
    # int8's scales travel with its check: the layers it quantises, each [input, output] max
    assert set(checked.int8_ranges) == {"encoder.0", "decoder.3"}
    bundle = save_bundle(tmp_path / "b", model=model, calibration=checked)
    unchecked = save_bundle(tmp_path / "u", model=model, calibration=calibration)
    assert bundle.version != unchecked.version  # the checks are part of the version
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert manifest["calibration"]["precision"] == "fp32"
    assert manifest["calibration"]["precision_checks"] == json.loads(
        json.dumps(checked.precision_checks)
    )
    loaded = load_bundle(tmp_path / "b").calibration
    assert loaded.precision == "fp32"
    assert loaded.precision_checks == checked.precision_checks
    passed = [p for p in ("bf16", "int8") if checked.precision_checks[p]["passed"]]
    assert loaded.validated_precisions == ("fp32", *passed)


def test_a_bundle_from_before_precisions_loads_as_fp32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = VAE(ModelConfig(kind="mlp", mlp_hidden=(16,), latent_dim=4))
    save_bundle(tmp_path / "old", model=model, calibration=_calibration())
    path = tmp_path / "old" / MANIFEST
    manifest = json.loads(path.read_text())
    for key in ("precision", "precision_checks"):
        del manifest["calibration"][key]
    manifest["model_version"] = _content_version(
        manifest["model_config"], manifest["calibration"], manifest["files"]
    )
    path.write_text(json.dumps(manifest))
    calibration = load_bundle(tmp_path / "old").calibration
    assert calibration.precision == "fp32"
    assert calibration.validated_precisions == ("fp32",)


def test_auto_picks_the_fastest_validated_precision(monkeypatch) -> None:
    monkeypatch.setattr(scorer, "native_bf16", lambda: True)
    monkeypatch.setattr(scorer, "fast_int8", lambda: True)
    every = ("fp32", "int8", "bf16")
    assert resolve_precision("auto", CPU, kind="mlp", validated=every) == "int8"
    assert resolve_precision("auto", CPU, kind="mlp", validated=("fp32", "bf16")) == "bf16"
    assert resolve_precision("auto", CPU, kind="conv", validated=every) == "bf16"
    assert resolve_precision("auto", CPU, kind="conv", validated=("fp32", "int8")) == "int8"
    assert resolve_precision("auto", CPU, kind="mlp", validated=("fp32",)) == "fp32"
    assert resolve_precision("int8", CPU, kind="conv", validated=("fp32",)) == "int8"
    monkeypatch.setattr(scorer, "fast_int8", lambda: False)  # say, an ARM CPU
    assert resolve_precision("auto", CPU, kind="mlp", validated=every) == "bf16"
    monkeypatch.setattr(scorer, "native_bf16", lambda: False)
    assert resolve_precision("auto", CPU, kind="conv", validated=every) == "fp32"


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_auto_on_a_cpu_without_bf16_picks_a_validated_int8(monkeypatch, kind: str) -> None:
    """Issue 29: on an AVX2 CPU (no native bf16: this machine's kind) `auto` picks int8 for a
    bundle whose calibration validated it, for both model kinds; fp32 where int8's check failed
    or holds no activation ranges (issue 21's per-batch int8, which `auto` never picked)."""
    monkeypatch.setattr(scorer, "native_bf16", lambda: False)
    monkeypatch.setattr(scorer, "fast_int8", lambda: True)
    torch.manual_seed(0)
    model = VAE(ModelConfig(kind=kind, mlp_hidden=(32,), conv_channels=(4, 8), latent_dim=4))
    images = torch.rand(64, 784)
    ranges = activation_ranges(model, images)
    passed = {"passed": True, "activation_ranges": ranges}
    both = {"int8": passed, "bf16": {"passed": True}}
    detector = Detector(model, _calibration(precision_checks=both), version="v", device="cpu")
    assert detector.precision == "int8" and detector.int8_ranges == ranges
    failed = {"int8": {**passed, "passed": False}, "bf16": {"passed": True}}
    detector = Detector(model, _calibration(precision_checks=failed), version="v", device="cpu")
    assert detector.precision == "fp32"
    per_batch = {"int8": {"passed": True}}  # a bundle of issue 21: no ranges
    detector = Detector(model, _calibration(precision_checks=per_batch), version="v", device="cpu")
    assert detector.precision == "fp32"


def test_int8_on_a_bundle_without_activation_ranges_is_a_one_line_error() -> None:
    model = VAE(ModelConfig(kind="mlp", mlp_hidden=(8,), latent_dim=2))
    calibration = _calibration(precision_checks={"int8": {"passed": True}})
    with pytest.raises(PrecisionError) as info:
        Detector(model, calibration, version="v", device="cpu", precision="int8")
    message = str(info.value)
    assert "activation ranges" in message and "recalibrate" in message and "\n" not in message


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_auto_on_a_cuda_device_resolves_to_fp32(kind: str) -> None:
    """Issue 21, item 5: whatever the bundle validated, `auto` on a GPU never picks a CPU int8
    (or bf16) path, and asking for one there is a one-line error. No GPU is needed: the
    function only reads the device's type."""
    for cuda in (torch.device("cuda"), torch.device("cuda:1")):
        validated = ("fp32", "int8", "bf16")
        assert resolve_precision("auto", cuda, kind=kind, validated=validated) == "fp32"
        assert resolve_precision("fp32", cuda, kind=kind, validated=validated) == "fp32"
        for precision in ("int8", "bf16"):
            with pytest.raises(PrecisionError) as info:
                resolve_precision(precision, cuda, kind=kind, validated=validated)
            assert "CPU only" in str(info.value) and "\n" not in str(info.value)
            assert isinstance(info.value, DeviceError)  # the CLI's one-line user error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_detector_with_auto_scores_in_fp32(trained_bundle: Path, fashion_mnist) -> None:
    bundle = load_bundle(trained_bundle)
    checks = {"int8": {"passed": True}, "bf16": {"passed": True}}
    calibration = Calibration(
        threshold=bundle.calibration.threshold,
        target_fpr=bundle.calibration.target_fpr,
        method=bundle.calibration.method,
        scores=bundle.calibration.scores,
        precision_checks=checks,
    )
    detector = Detector(bundle.model, calibration, version="v", device="cuda", precision="auto")
    assert detector.precision == "fp32"
    images = fashion_mnist.test.images[:256]
    expected = _fp32_model_scores(load_bundle(trained_bundle).model, images)
    np.testing.assert_allclose(detector.score(images).scores, expected, rtol=1e-4, atol=1e-2)


def test_a_bad_precision_is_a_one_line_settings_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, ["detector.precision=int4"], env={})
    message = str(info.value)
    assert "detector.precision" in message and "int4" in message and "\n" not in message
    with pytest.raises(PrecisionError) as info:
        Detector(VAE(ModelConfig(kind="mlp", mlp_hidden=(8,))), _calibration(), version="v",
                 device="cpu", precision="int4")  # fmt: skip
    assert "int4" in str(info.value) and "\n" not in str(info.value)
    assert load_settings(None, ["detector.precision=int8"], env={}).detector.precision == "int8"
    assert DetectorSettings().precision == "auto"


def test_scoring_in_another_precision_than_calibrated_says_so_once(caplog, monkeypatch) -> None:
    model = VAE(ModelConfig(kind="mlp", mlp_hidden=(8,), latent_dim=2))
    with caplog.at_level(logging.INFO, logger="detector.scorer"):
        same = Detector(model, _calibration(), version="v1", device="cpu", precision="auto")
    assert same.precision == "fp32" and not caplog.records
    ranges = activation_ranges(model, torch.rand(16, 784))
    unvalidated = _calibration(
        precision_checks={"int8": {"passed": False, "activation_ranges": ranges}}
    )
    with caplog.at_level(logging.INFO, logger="detector.scorer"):
        other = Detector(model, unvalidated, version="v2", device="cpu", precision="int8")
    assert other.precision == "int8"
    [record] = caplog.records
    assert "calibrated in fp32 and is scored in int8" in record.getMessage()
    assert record.levelno == logging.WARNING  # int8 was not validated for this calibration
    caplog.clear()
    monkeypatch.setattr(scorer, "native_bf16", lambda: True)
    validated = _calibration(precision_checks={"bf16": {"passed": True}})
    with caplog.at_level(logging.INFO, logger="detector.scorer"):
        auto = Detector(model, validated, version="v3", device="cpu", precision="auto")
    assert auto.precision == "bf16"
    [record] = caplog.records
    assert record.levelno == logging.INFO and "validated" in record.getMessage()
    # A hot swap keeps `auto`, to be resolved again for the next bundle's calibration.
    assert auto.settings.precision == "auto" and auto.settings.device == "cpu"


def test_an_unknown_precision_in_a_calibration_is_refused() -> None:
    with pytest.raises(ValueError, match="fp16"):
        _calibration(precision="fp16")
    with pytest.raises(ValueError, match="int4"):
        _calibration(precision_checks={"int4": {"passed": True}})
