"""Shared fixtures: real services and real data, started per session on free ports."""

from collections.abc import Iterator

import pytest

from tests.fixtures_broker import *  # noqa: F403
from tests.fixtures_model import *  # noqa: F403
from tests.fixtures_model import one_torch_thread
from tests.fixtures_secured_kafka import *  # noqa: F403


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Every in-process test trains or scores small models: one torch thread each."""
    with one_torch_thread():
        yield
