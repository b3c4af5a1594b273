"""Commands without a Kafka client do not import one: `vaewatch score` is a whole process in
the benchmarks (bench/score_process.py) and kafka-python with the worker cost it about 0.3 s of
a few seconds. The Kafka-side errors still end a command in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from vaewatch.cli import main

_LOADED = """
import sys
from vaewatch.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] == "kafka" or m.startswith("streams.w"))
print("exit", code, "loaded", heavy)
"""


def test_vaewatch_score_loads_no_kafka_client(trained_bundle: Path, tmp_path: Path) -> None:
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((3, 28, 28), dtype=np.uint8))
    args = ["--config", "/dev/null", "score", "--model", str(trained_bundle), str(images)]
    done = subprocess.run(
        [sys.executable, "-c", _LOADED, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "exit 0 loaded []", done.stderr


def test_a_broker_that_does_not_answer_is_still_one_line(tmp_path: Path, capsys) -> None:
    """user_errors() imports the Kafka-side errors only once an error is on its way."""
    images = tmp_path / "images.npz"
    np.savez(images, x_test=np.zeros((2, 28, 28), dtype=np.uint8), y_test=np.zeros(2, np.uint8))
    code = main(
        [
            "--config", "/dev/null",
            "--set", "stream.bootstrap_servers=127.0.0.1:9",
            "--set", "stream.bootstrap_timeout_ms=1000",
            "--set", f"data.dataset=npz:{images}",
            "produce", "--split", "test", "--count", "1",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("vaewatch: error: ") and "Traceback" not in err
