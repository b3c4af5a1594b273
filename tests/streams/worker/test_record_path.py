"""docs/delivery.md walks a record from poll to commit through named functions: each one exists
where the page says, and the path stays within 12 steps in 6 files (issue 19)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
ROW = re.compile(r"^\| (\d+) \| `([\w/]+)\.py` \| `([\w.]+)` \|", re.MULTILINE)


def _steps() -> list[tuple[int, str, str]]:
    page = (REPO / "docs" / "delivery.md").read_text()
    return [(int(n), path, name) for n, path, name in ROW.findall(page)]


def test_every_step_names_a_function_that_exists() -> None:
    steps = _steps()
    assert [n for n, _, _ in steps] == list(range(1, len(steps) + 1))
    for n, path, name in steps:
        target: object = importlib.import_module(path.replace("/", "."))
        for part in name.split("."):
            assert hasattr(target, part), f"step {n}: {path}.py has no {name}"
            target = getattr(target, part)
        assert callable(target), f"step {n}: {name} is not a function"


def test_the_path_stays_short() -> None:
    steps = _steps()
    assert 8 <= len(steps) <= 12, len(steps)
    assert len({path for _, path, _ in steps}) <= 6
