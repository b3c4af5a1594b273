"""Bundle round trip, and every kind of damage giving a one-line BundleError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.bundle import (
    CALIBRATION,
    MANIFEST,
    WEIGHTS,
    BundleError,
    load_bundle,
    save_bundle,
)
from detector.calibration import Calibration
from detector.config import ModelConfig
from detector.model import VAE


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = VAE(ModelConfig(kind="mlp", mlp_hidden=(32,), latent_dim=4))
    calibration = Calibration(
        threshold=1.5, target_fpr=0.1, method="conformal", scores=np.linspace(0, 2, 30)
    )
    save_bundle(tmp_path / "b", model=model, calibration=calibration, metadata={"note": "x"})
    return tmp_path / "b"


def test_round_trip_gives_the_same_scores(bundle_dir: Path) -> None:
    x = torch.rand(5, 784)
    torch.manual_seed(0)  # the fixture's seed: the same initial weights
    original = VAE(ModelConfig(kind="mlp", mlp_hidden=(32,), latent_dim=4)).eval()
    loaded = load_bundle(bundle_dir)
    torch.testing.assert_close(loaded.model.score(x), original.score(x))
    assert loaded.calibration.threshold == 1.5
    assert loaded.calibration.n == 30
    assert loaded.metadata == {"note": "x"}
    assert len(loaded.version) == 12


def test_version_is_a_content_hash(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    again = save_bundle(
        tmp_path / "again", model=bundle.model, calibration=bundle.calibration, metadata={}
    )
    assert again.version == bundle.version
    other = Calibration(threshold=1.0, target_fpr=0.1, method="conformal", scores=np.ones(3))
    changed = save_bundle(tmp_path / "changed", model=bundle.model, calibration=other)
    assert changed.version != bundle.version


def _error(path: Path) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", [WEIGHTS, CALIBRATION])
def test_flipped_byte_is_caught(bundle_dir: Path, name: str) -> None:
    file = bundle_dir / name
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    assert "digest" in _error(bundle_dir)


@pytest.mark.parametrize("name", [WEIGHTS, CALIBRATION, MANIFEST])
def test_missing_file_is_caught(bundle_dir: Path, name: str) -> None:
    (bundle_dir / name).unlink()
    assert name in _error(bundle_dir)


def test_missing_directory(tmp_path: Path) -> None:
    assert "no model bundle" in _error(tmp_path / "nowhere")


def _edit_manifest(bundle_dir: Path, edit) -> None:
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    edit(manifest)
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest))


def test_edited_config_is_caught(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda m: m["model_config"].update(beta=5.0))
    assert "changed after the bundle was written" in _error(bundle_dir)


def test_edited_threshold_is_caught(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda m: m["calibration"].update(threshold=0.0))
    assert "changed after" in _error(bundle_dir)


def test_weights_of_another_architecture_are_caught(bundle_dir: Path, tmp_path: Path) -> None:
    other = VAE(ModelConfig(kind="mlp", mlp_hidden=(16,), latent_dim=4))
    calibration = load_bundle(bundle_dir).calibration
    save_bundle(tmp_path / "other", model=other, calibration=calibration)
    # Swap in the other weights and their digest: only the shape check can notice.
    shutil.copy(tmp_path / "other" / WEIGHTS, bundle_dir / WEIGHTS)
    other_digest = json.loads((tmp_path / "other" / MANIFEST).read_text())["files"][WEIGHTS]

    def swap(manifest: dict) -> None:
        from detector.bundle import _content_version

        manifest["files"][WEIGHTS] = other_digest
        manifest["model_version"] = _content_version(
            manifest["model_config"], manifest["calibration"], manifest["files"]
        )

    _edit_manifest(bundle_dir, swap)
    assert "do not match the model config" in _error(bundle_dir)


def test_invalid_config_value_is_caught(bundle_dir: Path) -> None:
    def bad_kind(manifest: dict) -> None:
        from detector.bundle import _content_version

        manifest["model_config"]["kind"] = "transformer"
        manifest["model_version"] = _content_version(
            manifest["model_config"], manifest["calibration"], manifest["files"]
        )

    _edit_manifest(bundle_dir, bad_kind)
    assert "model_config.kind" in _error(bundle_dir)


@pytest.mark.parametrize(
    "text",
    ["{not json", "[]", json.dumps({"format_version": 99}), json.dumps({"format_version": 1})],
)
def test_bad_manifest_is_caught(bundle_dir: Path, text: str) -> None:
    (bundle_dir / MANIFEST).write_text(text)
    _error(bundle_dir)


def _latent_model() -> VAE:
    torch.manual_seed(0)
    config = ModelConfig(
        kind="mlp", mlp_hidden=(32,), latent_dim=2, latent_components=2,
        transforms=0, transform_weight=0.0,
    )  # fmt: skip
    model = VAE(config)  # issue 13's score: three terms, no transform head
    model.latent.set_density(
        torch.tensor([[0.0, 1.0], [2.0, -1.0]]),
        torch.tensor([[[1.0, 0.0], [0.2, 0.5]], [[0.3, 0.0], [0.0, 2.0]]]),
        torch.tensor([0.25, 0.75]),
    )
    model.set_score_normalisation(torch.tensor([700.0, 2.0, 40.0]), torch.tensor([30.0, 1.5, 9.0]))
    return model.eval()


def test_latent_density_is_saved_with_the_weights(tmp_path: Path) -> None:
    model = _latent_model()
    calibration = Calibration(threshold=0.5, target_fpr=0.1, method="conformal", scores=np.ones(9))
    save_bundle(tmp_path / "b", model=model, calibration=calibration)
    loaded = load_bundle(tmp_path / "b").model
    for name in ("means", "scale_tril", "log_weights"):
        assert torch.equal(getattr(loaded.latent, name), getattr(model.latent, name)), name
    assert torch.equal(loaded.score_normalisation, model.score_normalisation)
    x = torch.rand(5, 784)
    torch.testing.assert_close(loaded.score(x), model.score(x))


def test_tampered_latent_statistics_are_caught(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    calibration = Calibration(threshold=0.5, target_fpr=0.1, method="conformal", scores=np.ones(9))
    save_bundle(tmp_path / "b", model=_latent_model(), calibration=calibration)
    weights = load_file(str(tmp_path / "b" / WEIGHTS))
    weights["score_normalisation"][1, 1] *= 100.0  # would silence the latent term
    save_file(weights, str(tmp_path / "b" / WEIGHTS))
    assert "digest" in _error(tmp_path / "b")


def test_a_bundle_from_before_the_latent_density_loads_and_scores_the_elbo(
    tmp_path: Path,
) -> None:
    """Bundles written before the latent density and the fused score existed have neither their
    settings nor their weights; they load without them and keep scoring the plain negative ELBO."""
    from detector.bundle import _content_version

    torch.manual_seed(0)
    before = {
        "latent_components": 0, "latent_weight": 0.0, "complexity_weight": 0.0,
        "transforms": 0, "transform_weight": 0.0,
    }  # fmt: skip
    model = VAE(ModelConfig(kind="mlp", mlp_hidden=(32,), latent_dim=4, **before))
    calibration = Calibration(threshold=9.0, target_fpr=0.1, method="conformal", scores=np.ones(9))
    save_bundle(tmp_path / "old", model=model, calibration=calibration)

    def as_written_before(manifest: dict) -> None:
        for key in [*before, "transform_loss_weight", "transform_scored"]:
            del manifest["model_config"][key]
        manifest["model_version"] = _content_version(
            manifest["model_config"], manifest["calibration"], manifest["files"]
        )

    _edit_manifest(tmp_path / "old", as_written_before)
    loaded = load_bundle(tmp_path / "old").model
    assert loaded.latent is None
    x = torch.rand(3, 784)
    torch.testing.assert_close(loaded.score(x), model.elbo_score(x))
    assert loaded.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 784)


# --- damage that must give one line, not a traceback or a huge allocation (issue 9, finding 7) --


def _reseal(bundle_dir: Path) -> None:
    """Recompute the digests and version after an edit, as a careless tool would: only the
    checks that look inside the files can notice."""
    from detector.bundle import _content_version, _sha256

    def seal(manifest: dict) -> None:
        for name in (WEIGHTS, CALIBRATION):
            manifest["files"][name] = _sha256(bundle_dir / name)
        manifest["model_version"] = _content_version(
            manifest["model_config"], manifest["calibration"], manifest["files"]
        )

    _edit_manifest(bundle_dir, seal)


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), float("-inf")])
def test_a_threshold_that_is_not_a_number_is_refused(bundle_dir: Path, threshold: float) -> None:
    # A NaN threshold loads and flags nothing: every `score > nan` is false.
    _edit_manifest(bundle_dir, lambda m: m["calibration"].update(threshold=threshold))
    _reseal(bundle_dir)
    assert "calibration threshold" in _error(bundle_dir)


def test_a_deeply_nested_manifest_is_one_line(bundle_dir: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    (bundle_dir / MANIFEST).write_text('{"format_version": 1, "metadata": ' + deep + "}")
    assert "nested too deeply" in _error(bundle_dir)


@pytest.mark.parametrize(
    "edit",
    [
        {"mlp_hidden": [50_000_000]},  # 160 GB of weights if it were built
        {"mlp_hidden": [10**30]},
        {"latent_dim": 1000, "mlp_hidden": [32, 2**40]},
        {"kind": "conv", "conv_channels": [1_000_000, 1_000_000]},
    ],
)
def test_an_absurd_model_config_is_refused_before_anything_is_allocated(
    bundle_dir: Path, edit: dict
) -> None:
    import resource

    _edit_manifest(bundle_dir, lambda m: m["model_config"].update(edit))
    _reseal(bundle_dir)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    message = _error(bundle_dir)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert "model_config" in message or "do not match the model config" in message
    assert grown_mib < 200, f"loading grew the process by {grown_mib:.0f} MiB"


def test_weights_of_the_wrong_shape_are_named(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda m: m["model_config"].update(mlp_hidden=[48]))
    _reseal(bundle_dir)
    message = _error(bundle_dir)
    assert "do not match the model config" in message and "[32, 784]" in message


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (CALIBRATION, b"not a safetensors file at all", "not a readable calibration file"),
        (CALIBRATION, None, "not a readable calibration file"),  # valid file, no 'scores'
        (WEIGHTS, b"\x00" * 64, "not a readable safetensors file"),
    ],
)
def test_a_corrupt_file_is_named_for_what_it_is(
    bundle_dir: Path, name: str, content: bytes | None, expected: str
) -> None:
    if content is None:
        from safetensors.numpy import save_file

        save_file({"other": np.ones(3)}, str(bundle_dir / name))
    else:
        (bundle_dir / name).write_bytes(content)
    _reseal(bundle_dir)
    message = _error(bundle_dir)
    assert expected in message and name in message
    if name == CALIBRATION:
        assert "weights" not in message


def _headed_model() -> VAE:
    torch.manual_seed(0)
    config = ModelConfig(
        kind="conv", conv_channels=(8, 16), latent_dim=4, latent_components=2,
        transforms=4, transform_weight=1.0,
    )  # fmt: skip
    model = VAE(config)
    model.set_score_normalisation(
        torch.tensor([700.0, 2.0, 40.0, 5.0]), torch.tensor([30.0, 1.5, 9.0, 2.0])
    )
    return model.eval()


def test_a_transform_head_round_trips_and_scores_in_a_rebuilt_model(tmp_path: Path) -> None:
    """The head and its term's normalisation are saved with the weights; the bundle scores the
    same through load_bundle and through a model rebuilt from its config and state (as the
    worker's scoring process does: `VAE(config)`, `load_state_dict`, `score_batches`)."""
    from detector.scorer import score_batches

    model = _headed_model()
    calibration = Calibration(threshold=0.5, target_fpr=0.1, method="conformal", scores=np.ones(9))
    save_bundle(tmp_path / "b", model=model, calibration=calibration)
    loaded = load_bundle(tmp_path / "b").model
    assert torch.equal(loaded.transform_head.weight, model.transform_head.weight)
    assert loaded.score_normalisation.shape == (4, 2)
    images = torch.randint(0, 256, (7, 784), dtype=torch.uint8)
    expected = score_batches(model, images, device=torch.device("cpu"), batch_size=3)
    torch.testing.assert_close(
        score_batches(loaded, images, device=torch.device("cpu"), batch_size=7), expected
    )
    state = {k: v.numpy() for k, v in loaded.state_dict().items()}
    rebuilt = VAE(loaded.config)
    rebuilt.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    rebuilt.eval()
    torch.testing.assert_close(
        score_batches(rebuilt, images, device=torch.device("cpu"), batch_size=7), expected
    )


def test_a_bundle_from_before_the_transform_head_loads_without_one(tmp_path: Path) -> None:
    """A bundle written before `transforms` existed (a fused score of three terms) loads with no
    head and scores as it did."""
    from detector.bundle import _content_version

    model = _latent_model()
    calibration = Calibration(threshold=0.5, target_fpr=0.1, method="conformal", scores=np.ones(9))
    save_bundle(tmp_path / "b", model=model, calibration=calibration)

    def as_written_before(manifest: dict) -> None:
        for key in ("transforms", "transform_loss_weight", "transform_scored", "transform_weight"):
            del manifest["model_config"][key]
        manifest["model_version"] = _content_version(
            manifest["model_config"], manifest["calibration"], manifest["files"]
        )

    _edit_manifest(tmp_path / "b", as_written_before)
    loaded = load_bundle(tmp_path / "b").model
    assert loaded.transform_head is None
    x = torch.rand(3, 784)
    torch.testing.assert_close(loaded.score(x), model.score(x))


def test_loading_a_bundle_does_not_import_the_compiler(bundle_dir: Path) -> None:
    """Every command and worker loads a bundle at start: its shape check builds the model on
    the meta device, where torch.eye imported torch._dynamo (about a second, each time)."""
    import subprocess
    import sys

    code = (
        "import sys; from detector.bundle import load_bundle; "
        f"load_bundle({str(bundle_dir)!r}); print('torch._dynamo' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stderr
