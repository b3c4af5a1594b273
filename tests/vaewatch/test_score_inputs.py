"""`vaewatch score` on damaged and unusual input files: each a one-line `vaewatch: error: ...`
and exit status 2, or a correct result, never a traceback (issue 9, finding 7)."""

from __future__ import annotations

import gzip
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector.bundle import save_bundle
from detector.calibration import Calibration
from detector.config import ModelConfig
from detector.model import VAE
from detector.preprocess import LEGACY_PREPROCESSING, ImageDecoding
from vaewatch.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bundle") / "b"
    calibration = Calibration(
        threshold=600.0, target_fpr=0.1, method="conformal", scores=np.linspace(500, 700, 50)
    )
    save_bundle(path, model=VAE(ModelConfig(kind="mlp", mlp_hidden=(16,), latent_dim=2)),
                calibration=calibration)  # fmt: skip
    return path


def _score(model_dir: Path, source: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["--config", "/dev/null", "score", "--model", str(model_dir), str(source)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert err.startswith("vaewatch: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err


def _idx(images: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">iii", *images.shape) + images.tobytes()


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def _write(tmp_path: Path, case: str) -> Path:
    """One damaged input per case; returns the path to give `vaewatch score`."""
    good = _images(3)
    if case == "corrupt.npz":
        np.savez(tmp_path / case, x=good)
        data = bytearray((tmp_path / case).read_bytes())
        (tmp_path / case).write_bytes(bytes(data[: len(data) // 2]))  # BadZipFile
    elif case == "corrupt-member.npz":
        with zipfile.ZipFile(tmp_path / case, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("x.npy", b"\x93NUMPY garbage")
    elif case == "object.npy":
        np.save(tmp_path / case, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif case == "object.npz":
        np.savez(tmp_path / case, x=np.array([{"a": 1}], dtype=object))
    elif case == "empty.npy":
        np.save(tmp_path / case, np.zeros((0, 28, 28), np.uint8))
    elif case == "empty-flat.npy":
        np.save(tmp_path / case, np.zeros((0, 784), np.uint8))
    elif case == "empty.npz":
        np.savez(tmp_path / case, x=np.zeros((0, 784), np.uint8))
    elif case == "empty-images-idx3-ubyte":
        (tmp_path / case).write_bytes(_idx(np.zeros((0, 28, 28), np.uint8)))
    elif case == "truncated.npy":
        np.save(tmp_path / case, good)
        data = (tmp_path / case).read_bytes()
        (tmp_path / case).write_bytes(data[:-100])
    elif case == "huge-header.npy":
        # A header promising 10**9 images (784 GB) in front of 3 images' bytes.
        with (tmp_path / case).open("wb") as stream:
            header = {"descr": "|u1", "fortran_order": False, "shape": (10**9, 28, 28)}
            np.lib.format.write_array_header_1_0(stream, header)
            stream.write(good.tobytes())
    elif case == "truncated-images-idx3-ubyte":
        (tmp_path / case).write_bytes(_idx(good)[:-10])
    elif case == "magic-images-idx3-ubyte":
        (tmp_path / case).write_bytes(b"\x01\x02" + _idx(good)[2:])
    elif case == "header-images-idx3-ubyte":
        (tmp_path / case).write_bytes(b"\x00\x00\x08\x03\x00\x00")
    elif case == "truncated-images-idx3-ubyte.gz":
        (tmp_path / case).write_bytes(gzip.compress(_idx(good))[:-20])
    elif case == "corrupt-images-idx3-ubyte.gz":
        packed = bytearray(gzip.compress(_idx(good)))
        packed[20:40] = b"\xff" * 20
        (tmp_path / case).write_bytes(bytes(packed))
    elif case == "bomb":
        (tmp_path / case).mkdir()
        # 20000 x 20000: a PNG header claiming 400 million pixels; Pillow refuses to decode it.
        Image.new("1", (20000, 20000)).save(tmp_path / case / "a.png", optimize=True)
    elif case == "float-png":
        (tmp_path / case).mkdir()
        Image.fromarray(np.zeros((28, 28), np.float32)).save(tmp_path / case / "a.tiff")
        (tmp_path / case / "a.tiff").rename(tmp_path / case / "a.png")
    elif case == "truncated-png":
        (tmp_path / case).mkdir()
        Image.fromarray(good[0]).save(tmp_path / case / "a.png")
        data = (tmp_path / case / "a.png").read_bytes()
        (tmp_path / case / "a.png").write_bytes(data[: len(data) // 2])
    else:
        raise AssertionError(case)
    return tmp_path / case


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("corrupt.npz", "not a readable .npz file"),
        ("corrupt-member.npz", "not a readable .npz file"),
        ("object.npy", "not a readable .npy file"),  # never unpickled
        ("object.npz", "not a readable .npz file"),
        ("empty.npy", "holds no images"),
        ("empty-flat.npy", "holds no images"),
        ("empty.npz", "holds no images"),
        ("empty-images-idx3-ubyte", "holds no images"),
        ("truncated.npy", "not a readable .npy file"),
        ("huge-header.npy", "not a readable .npy file"),
        ("truncated-images-idx3-ubyte", "IDX header says"),
        ("magic-images-idx3-ubyte", "bad magic number"),
        ("header-images-idx3-ubyte", "truncated IDX header"),
        ("truncated-images-idx3-ubyte.gz", "cannot read IDX file"),
        ("corrupt-images-idx3-ubyte.gz", "IDX"),  # the header or the data fails to inflate
        ("bomb", "a.png: too_large: Image size (400000000 pixels) exceeds limit"),
        ("float-png", "a.png: bad_depth"),  # a TIFF named .png: its content decides
        ("truncated-png", "a.png: corrupt_image"),
    ],
)
def test_a_bad_input_is_one_line_and_exit_2(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, case: str, expected: str
) -> None:
    source = _write(tmp_path, case)
    code, out, err = _score(model_dir, source, capsys)
    _assert_one_line_error(code, err, expected, source.name)
    assert out == ""


def test_a_16_bit_png_is_scaled_as_png_defines(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """16-bit samples map to 8 bits as round(v * 255 / 65535): the same image saved in 8 and in
    16 bits scores the same (Pillow's convert("L") clipped them at 255: nearly all white)."""
    from trainer.data import read_image_file

    picture = _images(1)[0]
    (tmp_path / "8").mkdir()
    (tmp_path / "16").mkdir()
    Image.fromarray(picture).save(tmp_path / "8" / "a.png")
    Image.fromarray(picture.astype(np.uint16) * 257).save(tmp_path / "16" / "a.png")
    assert Image.open(tmp_path / "16" / "a.png").mode.startswith("I;16")
    legacy = ImageDecoding(LEGACY_PREPROCESSING)
    loaded = read_image_file(tmp_path / "16", decoding=legacy)
    np.testing.assert_array_equal(loaded.images[0], picture.ravel())
    code8, out8, _ = _score(model_dir, tmp_path / "8", capsys)
    code16, out16, _ = _score(model_dir, tmp_path / "16", capsys)
    assert code8 == code16 == 0
    assert out16 == out8 and out8.count("\n") == 2  # header and one row


def test_a_gzip_idx_that_inflates_far_beyond_its_header_is_not_inflated(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A decompression bomb: a header for 3 images, then 300 MB of zeros in 300 KB of gzip.
    Reading stops at the size the header states."""
    import resource

    source = tmp_path / "bomb-images-idx3-ubyte.gz"
    with gzip.open(source, "wb", compresslevel=1) as stream:
        stream.write(_idx(_images(3)))
        zeros = bytes(1 << 20)
        for _ in range(300):
            stream.write(zeros)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, _, err = _score(model_dir, source, capsys)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    _assert_one_line_error(code, err, "IDX header says (3, 28, 28)", "file has more")
    assert grown_mib < 100, f"reading grew the process by {grown_mib:.0f} MiB"
