"""vaewatch train / evaluate / score / sample, run through the CLI entry point."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from detector import load_bundle
from tests.fixtures_model import SMALL_BUNDLE_NORMAL_CLASS
from vaewatch.cli import main

EVALUATE_KEYS = {
    "auroc", "auprc", "threshold", "fpr", "tpr", "precision", "recall", "f1",
    "n_normal", "n_anomaly",
}  # fmt: skip


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--log-level", "WARNING", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_writes_a_bundle(tmp_path: Path, fashion_mnist, capsys) -> None:
    train = fashion_mnist.train
    pick = np.flatnonzero(train.labels == 7)[:500]
    np.savez(tmp_path / "d.npz", x=train.images[pick], y=train.labels[pick])
    code, out, err = _run(
        capsys,
        "--set", f"data.dataset=npz:{tmp_path / 'd.npz'}",
        "--set", "data.normal_classes=[7]",
        "--set", "data.val_fraction=0.25",
        "--set", "model.kind=mlp",
        "--set", "model.mlp_hidden=[64]",
        "--set", "train.epochs=2",
        "--set", "train.progress=false",
        "--set", "calibration.target_fpr=0.05",
        "train", "--out", str(tmp_path / "model"),
    )  # fmt: skip
    assert code == 0, err
    bundle = load_bundle(tmp_path / "model")
    assert bundle.version in out and "threshold" in out
    assert bundle.calibration.n == 125 and bundle.calibration.target_fpr == 0.05
    assert bundle.metadata["data"]["normal_classes"] == [7]


def test_evaluate_json_agrees_with_score_output(
    trained_bundle: Path, fashion_mnist, tmp_path: Path, capsys
) -> None:
    code, out, err = _run(capsys, "evaluate", "--model", str(trained_bundle), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert set(report) >= EVALUATE_KEYS
    assert (report["n_normal"], report["n_anomaly"]) == (1000, 9000)
    assert (trained_bundle / "report" / "roc.png").is_file()

    test = fashion_mnist.test
    np.save(tmp_path / "test.npy", test.images.reshape(-1, 28, 28))
    code, _, err = _run(
        capsys, "score", "--model", str(trained_bundle), str(tmp_path / "test.npy"),
        "--out", str(tmp_path / "scores.csv"),
    )  # fmt: skip
    assert code == 0, err
    with (tmp_path / "scores.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [int(r["index"]) for r in rows] == list(range(10000))
    scores = np.array([float(r["score"]) for r in rows])
    flagged = np.array([r["anomaly"] == "1" for r in rows])
    is_anomaly = test.labels != SMALL_BUNDLE_NORMAL_CLASS
    assert roc_auc_score(is_anomaly, scores) == pytest.approx(report["auroc"], abs=1e-6)
    assert flagged[~is_anomaly].mean() == pytest.approx(report["fpr"])
    assert flagged[is_anomaly].mean() == pytest.approx(report["tpr"])
    p_values = np.array([float(r["p_value"]) for r in rows])
    assert np.all((p_values > 0) & (p_values <= 1))
    # score > threshold implies p <= target FPR (0.01 for this bundle): they never disagree.
    assert np.all(p_values[flagged] <= 0.01 + 1e-12)


def test_evaluate_prints_a_table(trained_bundle: Path, capsys) -> None:
    code, out, _ = _run(capsys, "evaluate", "--model", str(trained_bundle))
    assert code == 0
    assert "auroc" in out and "n_anomaly" in out


def test_score_png_folder_as_json_lines(trained_bundle: Path, fashion_mnist, tmp_path, capsys):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(fashion_mnist.test.images[i].reshape(28, 28)).save(folder / f"{i}.png")
    out_file = tmp_path / "scores.jsonl"
    code, _, err = _run(
        capsys, "score", "--model", str(trained_bundle), str(folder), "--out", str(out_file)
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["name"] for r in rows] == ["0.png", "1.png", "2.png"]
    assert set(rows[0]) == {"index", "score", "p_value", "anomaly", "name"}
    assert isinstance(rows[0]["anomaly"], bool)


def test_sample_png_and_npz(trained_bundle: Path, tmp_path: Path, capsys) -> None:
    code, _, _ = _run(
        capsys,
        "sample",
        "--model",
        str(trained_bundle),
        "--n",
        "64",
        "--out",
        str(tmp_path / "s.png"),
    )
    assert code == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    code, _, _ = _run(
        capsys,
        "sample",
        "--model",
        str(trained_bundle),
        "--n",
        "5",
        "--out",
        str(tmp_path / "s.npz"),
    )
    assert code == 0
    with np.load(tmp_path / "s.npz") as arrays:
        assert arrays["x"].shape == (5, 28, 28) and arrays["x"].dtype == np.uint8


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["score", "--model", "{bundle}", "{tmp}/absent.npy"], "no such file"),
        (["score", "--model", "{tmp}/nobundle", "{tmp}/absent.npy"], "no model bundle"),
        (["sample", "--model", "{bundle}", "--out", "{tmp}/s.gif"], ".png"),
        (["sample", "--model", "{bundle}", "--n", "0", "--out", "{tmp}/s.png"], "--n"),
        (["evaluate", "--model", "{bundle}", "--dataset", "idx:{tmp}/none"], "not a directory"),
        (["evaluate", "--model", "{bundle}", "--dataset", "cifar"], "unknown dataset"),
        (["--set", "detector.device=gpu", "evaluate", "--model", "{bundle}"], "device 'gpu'"),
    ],
)
def test_user_errors_exit_2_with_one_line(
    trained_bundle: Path, tmp_path: Path, capsys, argv: list[str], message: str
) -> None:
    argv = [a.format(bundle=trained_bundle, tmp=tmp_path) for a in argv]
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("vaewatch: error:") and err.count("\n") == 1
    assert message in err


def _photo_folder(root: Path, fashion_mnist, *, per_class: dict[str, int]) -> None:
    """Real Fashion-MNIST images as a user's folder: 64 x 64 JPEG files, ImageFolder layout."""
    names = {"tshirt": 0, "trouser": 1, "sneaker": 7}
    for split, source in (("train", fashion_mnist.train), ("test", fashion_mnist.test)):
        for name, label in names.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            n = per_class[split] if name == "tshirt" or split == "test" else 20
            for i, pixels in enumerate(source.images[source.labels == label][:n]):
                picture = Image.fromarray(pixels.reshape(28, 28)).resize((64, 64))
                picture.save(folder / f"{i:04d}.jpg", quality=90)


def test_train_evaluate_and_score_a_folder_of_jpeg_files(
    tmp_path: Path, fashion_mnist, capsys
) -> None:
    _photo_folder(tmp_path / "photos", fashion_mnist, per_class={"train": 600, "test": 60})
    (tmp_path / "photos" / "test" / "tshirt" / "broken.jpg").write_bytes(b"\xff\xd8\xff cut")
    settings = [
        "--set", f"data.dataset=folder:{tmp_path / 'photos'}",
        "--set", "data.normal_classes=[tshirt]",
        "--set", "model.kind=mlp", "--set", "model.mlp_hidden=[128]",
        "--set", "train.epochs=3", "--set", "train.progress=false",
        "--set", "images.resize=bicubic", "--set", "calibration.target_fpr=0.05",
    ]  # fmt: skip
    code, out, err = _run(capsys, *settings, "train", "--out", str(tmp_path / "model"))
    assert code == 0, err
    bundle = load_bundle(tmp_path / "model")
    assert bundle.preprocessing.resize == "bicubic" and bundle.preprocessing.invert is False
    assert bundle.metadata["n_train"] + bundle.metadata["n_val"] == 600  # T-shirts only

    code, out, err = _run(capsys, "evaluate", "--model", str(tmp_path / "model"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["n_normal"], report["n_anomaly"]) == (60, 120)  # the broken file left out
    assert report["auroc"] > 0.8

    one = tmp_path / "photos" / "test" / "sneaker" / "0000.jpg"
    code, out, err = _run(
        capsys, "score", "--model", str(tmp_path / "model"), str(one),
        str(tmp_path / "photos" / "test" / "tshirt"), "--format", "jsonl",
    )  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 1 + 60 and rows[0]["name"] == str(one)
    assert rows[1]["name"] == f"{tmp_path / 'photos' / 'test' / 'tshirt'}/0000.jpg"
    assert "broken.jpg" not in {row["name"] for row in rows}
