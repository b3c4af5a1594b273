"""The container tests (marker `containers`: podman, images built by `make image`) run only when
asked for by name, `pytest -m containers` (`make deploy-test`): any other run, with or without
its own -m, leaves them out."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "containers" in (config.option.markexpr or ""):
        return
    kept = [item for item in items if item.get_closest_marker("containers") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept
