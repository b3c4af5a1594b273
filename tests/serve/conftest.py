"""The service under test: `serve` on a real uvicorn server, on a free port, in this process
(so it shares the session's trained bundle without reloading torch in a subprocess)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from serve.config import ServeConfig
from serve.server import BackgroundServer, build_service
from tests.fixtures_model import CPU

LIMITS = {"max_images_per_request": 64, "max_body_bytes": 1024 * 1024}


@pytest.fixture
def start_service() -> Iterator[Callable[..., BackgroundServer]]:
    """start_service(bundle, stream=None, **serve settings) -> a running server; all stopped
    at the end of the test."""
    started: list[BackgroundServer] = []

    def start(bundle: Path, *, stream: Any = None, **settings: Any) -> BackgroundServer:
        config = ServeConfig(port=0, **{**LIMITS, **settings})
        service = build_service(bundle, config=config, detector=CPU, stream=stream)
        server = BackgroundServer(service).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def service_url(trained_bundle: Path) -> Iterator[str]:
    """One service with the default settings (and the test limits) for a module's tests."""
    config = ServeConfig(port=0, **LIMITS)
    server = BackgroundServer(build_service(trained_bundle, config=config, detector=CPU)).start()
    yield server.url
    server.stop()
