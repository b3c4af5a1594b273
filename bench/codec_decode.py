"""decode_batch against the codec of another commit, side by side (same process, same data,
interleaved rounds, so both see the same machine load).

    .venv/bin/python bench/codec_decode.py --baseline 80650f4

Batches of 1024 real Fashion-MNIST test images in each wire form: raw bytes, JSON with `b64`,
JSON with a `pixels` list. Each round times the baseline's decode_batch(values) and this tree's
decode_batch(values, keys=...) (the worker passes the keys); printed: the median time of each
and the median of the per-round ratios (this tree / baseline).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streams import codec as current  # noqa: E402
from trainer.config import DataConfig  # noqa: E402
from trainer.data import load_images  # noqa: E402


def baseline_codec(revision: str):
    source = subprocess.run(
        ["git", "show", f"{revision}:streams/codec.py"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "baseline_codec.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_codec", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["baseline_codec"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="80650f4", help="commit whose codec to compare")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    baseline = baseline_codec(args.baseline)
    images = load_images(DataConfig(), split="test").images[: args.batch]
    ids = [f"img-{i}" for i in range(len(images))]
    keys = [f"images/0/{i}".encode() for i in range(len(images))]
    forms = {
        "raw": (current.encode_images(images, codec="raw"), "raw"),
        "json b64": (current.encode_images(images, codec="json", ids=ids), "json"),
        "json pixels": (
            [
                ('{"pixels": [' + ",".join(map(str, row)) + f'], "id": "{ids[i]}"}}').encode()
                for i, row in enumerate(images.tolist())
            ],
            "json",
        ),
    }
    print(f"load average {os.getloadavg()[0]:.1f}, {len(images)} records a batch")
    print(f"{'form':12s} {'baseline ms':>12s} {'this tree ms':>13s} {'ratio':>6s}")
    for name, (values, codec) in forms.items():
        before, after, ratios = [], [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            baseline.decode_batch(values, codec=codec)
            middle = time.perf_counter()
            current.decode_batch(values, codec=codec, keys=keys)
            end = time.perf_counter()
            before.append(middle - start)
            after.append(end - middle)
            ratios.append((end - middle) / (middle - start))
        print(
            f"{name:12s} {np.median(before) * 1e3:12.2f} {np.median(after) * 1e3:13.2f} "
            f"{np.median(ratios):6.2f}"
        )


if __name__ == "__main__":
    main()
