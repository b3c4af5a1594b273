"""The precision check at calibration (issue 21): int8 and bf16 scores of the calibration images
compared with fp32's at the calibrated threshold, on a real trained bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detector.bundle import load_bundle
from tests.fixtures_model import SMALL_BUNDLE_NORMAL_CLASS
from trainer.calibrate import PRECISION_BAND, check_precision, validate_precisions


def test_int8_and_bf16_hold_the_band_on_a_trained_bundle(trained_bundle: Path, fashion_mnist):
    bundle = load_bundle(trained_bundle)
    test = fashion_mnist.test
    normal = test.images[test.labels == SMALL_BUNDLE_NORMAL_CLASS]
    anomalies = test.images[test.labels != SMALL_BUNDLE_NORMAL_CLASS][:2000]
    for precision in ("int8", "bf16"):
        check = check_precision(
            bundle.model,
            normal,
            bundle.calibration,
            precision=precision,
            anomalies=anomalies,
            int8_ranges=bundle.calibration.int8_ranges,
        )
        assert check["n"] == len(normal) and check["n_anomalies"] == len(anomalies)
        assert abs(check["auroc"] - check["auroc_reference"]) <= PRECISION_BAND, precision
        assert abs(check["fpr"] - check["fpr_reference"]) <= PRECISION_BAND, precision
        assert check["passed"], check
        assert 0.0 <= check["decisions_changed"] <= 0.01


def test_a_check_outside_the_band_does_not_pass(trained_bundle: Path, fashion_mnist) -> None:
    """A band below zero: nothing holds it, so nothing is validated and `auto` stays fp32."""
    bundle = load_bundle(trained_bundle)
    normal = fashion_mnist.test.images[fashion_mnist.test.labels == SMALL_BUNDLE_NORMAL_CLASS]
    check = check_precision(
        bundle.model,
        normal,
        bundle.calibration,
        precision="int8",
        band=-1,
        int8_ranges=bundle.calibration.int8_ranges,
    )
    assert check["passed"] is False
    assert "auroc" not in check  # no labelled anomalies given


def test_validate_precisions_keeps_the_threshold_and_scores(trained_bundle: Path, fashion_mnist):
    bundle = load_bundle(trained_bundle)
    normal = fashion_mnist.test.images[fashion_mnist.test.labels == SMALL_BUNDLE_NORMAL_CLASS]
    checked = validate_precisions(bundle.model, normal[:500], bundle.calibration)
    assert checked.threshold == bundle.calibration.threshold
    np.testing.assert_array_equal(checked.scores, bundle.calibration.scores)
    assert checked.precision == "fp32" and set(checked.precision_checks) == {"int8", "bf16"}
    assert checked.validated_precisions[0] == "fp32"


def test_a_threshold_set_from_int8_scores_says_so() -> None:
    """What `vaewatch recalibrate` needs when its detector scored in another precision."""
    from trainer.calibrate import calibrate_threshold

    calibration = calibrate_threshold(np.arange(200.0), target_fpr=0.05, precision="int8")
    assert calibration.precision == "int8" and calibration.validated_precisions == ("int8",)
    assert calibrate_threshold(np.arange(200.0), target_fpr=0.05).precision == "fp32"
