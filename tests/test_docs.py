"""The documentation is run: every shell block marked `<!-- doctest -->` in README.md, docs/ and
deploy/README.md, on a small Fashion-MNIST subset; and its links and names match the code.

A marked block runs with `bash -e -o pipefail` in a temporary folder shared by the blocks of one
page (in page order), with `vaewatch` on the path and VAEWATCH_* variables that pick a small data
set and one training epoch (a `--set` in the block still wins). Background jobs that a block
leaves running are stopped when it ends.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- doctest -->"
SHELL_FENCES = ("```bash", "```sh", "```shell")
PAGES = sorted([REPO / "README.md", REPO / "deploy" / "README.md", *(REPO / "docs").rglob("*.md")])
# Ports that the documented commands use by default (broker, worker metrics, HTTP service).
DOCUMENTED_PORTS = (9092, 9108, 8000)
BLOCK_TIMEOUT_S = 240
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def runnable_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, script) of each marked block, in page order."""
    lines = page.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = i + 1
        if fence >= len(lines) or lines[fence].strip() not in SHELL_FENCES:
            raise AssertionError(f"{page.name}:{i + 1}: {MARKER} must come right before ```bash")
        end = next(j for j in range(fence + 1, len(lines)) if lines[j].strip() == "```")
        blocks.append((fence + 1, "\n".join(lines[fence + 1 : end]) + "\n"))
    return blocks


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


PAGES_WITH_BLOCKS = [page for page in PAGES if runnable_blocks(page)]


def test_markers_and_pages_are_found() -> None:
    assert REPO / "README.md" in PAGES_WITH_BLOCKS
    assert len(runnable_blocks(REPO / "README.md")) >= 5


@pytest.fixture(scope="module")
def small_dataset(fashion_mnist, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 training and 300 test images per class of the real Fashion-MNIST."""
    rng = np.random.default_rng(0)

    def pick(labels: np.ndarray, n: int) -> np.ndarray:
        return np.sort(
            np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c in range(10)])
        )

    train, test = fashion_mnist.train, fashion_mnist.test
    tr, te = pick(train.labels, 1000), pick(test.labels, 300)
    path = tmp_path_factory.mktemp("doc-data") / "fashion-small.npz"
    np.savez(
        path,
        x_train=train.images[tr], y_train=train.labels[tr],
        x_test=test.images[te], y_test=test.labels[te],
    )  # fmt: skip
    return path


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _run_block(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = process.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        out += f"\n[doc test: killed after {BLOCK_TIMEOUT_S} s]"
    finally:
        _stop_group(process.pid)
    return subprocess.CompletedProcess(process.args, process.returncode, out)


def _stop_group(pgid: int) -> None:
    """Stop what the block left in the background: SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        for _ in range(50):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            subprocess.run(["sleep", "0.1"], check=False)


@pytest.mark.parametrize("page", PAGES_WITH_BLOCKS, ids=_rel)
def test_marked_shell_blocks_run(page: Path, small_dataset: Path, tmp_path: Path) -> None:
    assert shutil.which("curl"), "the documented commands use curl"
    busy = [port for port in DOCUMENTED_PORTS if not _port_is_free(port)]
    assert not busy, f"ports {busy} are taken: the documented commands need them free"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "VAEWATCH_DATA__DATASET": f"npz:{small_dataset}",
        "VAEWATCH_TRAIN__EPOCHS": "1",
        "OMP_NUM_THREADS": "1",
    }
    for line, script in runnable_blocks(page):
        done = _run_block(script, tmp_path, env)
        assert done.returncode == 0, (
            f"{_rel(page)}:{line}: block failed (exit {done.returncode}):\n{script}\n"
            f"--- output (last 3000 characters) ---\n{done.stdout[-3000:]}"
        )


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_to_files(page: Path) -> None:
    broken = []
    for target in _LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        if target.startswith("#"):
            target = page.name + target
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve()
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
            broken.append(target)
    assert broken == [], f"{_rel(page)} links to missing files or headings"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_wire_contract_names_every_dead_letter_reason_and_header() -> None:
    from streams.codec import DEAD_LETTER_REASONS
    from streams.worker import publish
    from streams.worker.metrics import UNSENDABLE

    page = (REPO / "docs" / "wire-contract.md").read_text()
    headers = [v for k, v in vars(publish).items() if k.startswith("H_") and isinstance(v, str)]
    missing = [f"`{name}`" for name in (*DEAD_LETTER_REASONS, UNSENDABLE, *headers)]
    assert [name for name in missing if name not in page] == []


def test_no_file_points_outside_the_repository() -> None:
    found = subprocess.run(
        ["git", "grep", "-n", "-e", r"\.\./shared"], cwd=REPO, capture_output=True, text=True
    )
    assert found.returncode == 1, found.stdout or found.stderr


def test_readme_lists_every_subcommand() -> None:
    from vaewatch.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    table = [
        line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `")
    ]
    missing = [name for name in commands if not any(f"`{name}" in row for row in table)]
    assert missing == [], "add these commands to README.md's command table"


def test_every_exported_metric_is_documented() -> None:
    from tests.deploy.deploy_files import exported_metric_families

    pages = "\n".join(page.read_text() for page in PAGES)
    missing = [name for name in exported_metric_families() if name not in pages]
    assert missing == [], "describe these metrics in deploy/README.md (or docs/)"
