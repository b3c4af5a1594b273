"""`vaewatch score` as a whole process, this tree against another checkout (issue 29, item 3).

Whole process: interpreter start, imports, loading the bundle, reading the input file, scoring
and writing the CSV, timed from outside (wall seconds of the child). Each tree scores a bundle
its own code trained with its own default settings (`vaewatch train`, `--set model.kind=...`
for the MLP), cached under --bundles; the trees run one after the other in each round, the order
alternating, and the figure is the median over rounds of the per-round ratio base / this tree.
`import torch` alone (the floor no scorer goes below) and `vaewatch --help` (the CLI's
imports) are timed in the same rounds, to say where the time goes.

    git worktree add /tmp/vaewatch-51279ae 51279ae
    .venv/bin/python bench/score_process.py --base /tmp/vaewatch-51279ae [--rounds 5]
    .venv/bin/python bench/cpu_modes.py -- bench/score_process.py --base /tmp/vaewatch-51279ae

Both trees run with this interpreter (this venv's torch), from their own folder with their own
code first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN_IMAGES = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
KINDS = {"conv": [], "mlp": ["--set", "model.kind=mlp"]}


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def _cli(tree: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "vaewatch.cli", "--log-level", "WARNING", *args]


def bundle_for(tree: Path, kind: str, bundles: Path, label: str) -> Path:
    """The bundle `tree`'s code trains with its defaults for `kind`, trained once and cached."""
    out = bundles / label / kind
    if not (out / "bundle.json").is_file():
        print(f"training the {kind} bundle of {label} ({tree}) ...", file=sys.stderr, flush=True)
        subprocess.run(
            _cli(tree, *KINDS[kind], "--set", "train.progress=false", "train", "--out", str(out)),
            cwd=tree,
            env=_env(tree),
            check=True,
        )
    return out


def wall_s(command: list[str], tree: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=tree, env=_env(tree), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, required=True, help="checkout of the base commit")
    parser.add_argument("--input", type=Path, default=TRAIN_IMAGES, help="images to score")
    parser.add_argument("--bundles", type=Path, default=Path("/tmp/vaewatch-score-process"))
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="settings for this tree's `vaewatch score` (e.g. detector.precision"
                        "=fp32)")  # fmt: skip
    args = parser.parse_args()
    trees = {"base": args.base.resolve(), "this tree": REPO}
    out = Path(tempfile.mkdtemp()) / "scores.csv"
    load = os.getloadavg()
    times: dict[tuple[str, str], list[float]] = {}
    ratios: dict[str, list[float]] = {kind: [] for kind in args.kinds}
    for kind in args.kinds:
        bundles = {
            label: bundle_for(tree, kind, args.bundles, label.replace(" ", "-"))
            for label, tree in trees.items()
        }
        for round_ in range(args.rounds + 1):  # round 0 warms the page cache, not counted
            order = list(trees) if round_ % 2 else list(trees)[::-1]
            took = {}
            for label in order:
                sets = [x for o in args.overrides for x in ("--set", o)] if label != "base" else []
                command = _cli(
                    trees[label], *sets, "score", "--model", str(bundles[label]),
                    str(args.input), "--out", str(out),
                )  # fmt: skip
                took[label] = wall_s(command, trees[label])
            took["import torch"] = wall_s([sys.executable, "-c", "import torch"], REPO)
            took["vaewatch --help"] = wall_s(_cli(REPO, "--help"), REPO)
            if round_ == 0:
                continue
            for label, seconds in took.items():
                times.setdefault((kind, label), []).append(seconds)
            ratios[kind].append(took["base"] / took["this tree"])
    print(
        f"\n`vaewatch score` of {args.input.name}, whole process, {args.rounds} rounds; load "
        f"average {load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; base {args.base}\n"
    )
    print("| model | base (s) | this tree (s) | speed-up, median of rounds (range) "
          "| `import torch` (s) | `vaewatch --help` (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    result = {}
    for kind in args.kinds:
        cells = [_median_range(times[(kind, label)]) for label in
                 ("base", "this tree", "import torch", "vaewatch --help")]  # fmt: skip
        speedup = statistics.median(ratios[kind])
        print(
            f"| {kind} | {cells[0]} | {cells[1]} | **{speedup:.2f}x** "
            f"({min(ratios[kind]):.2f}-{max(ratios[kind]):.2f}) | {cells[2]} | {cells[3]} |"
        )
        result[f"{kind} speed-up"] = speedup
        result[f"{kind} this tree s"] = statistics.median(times[(kind, "this tree")])
        result[f"{kind} base s"] = statistics.median(times[(kind, "base")])
    print("result: " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
