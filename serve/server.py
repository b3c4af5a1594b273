"""Running the app on uvicorn: in the foreground (`vaewatch serve`) or in a background thread
(`vaewatch demo`, the tests, the benchmark)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from detector.config import DetectorSettings
from detector.preprocess import ImageSettings
from serve.app import create_app
from serve.config import ServeConfig
from serve.metrics import ServeMetrics
from serve.service import ModelService
from streams.config import StreamConfig
from streams.tls import VERIFY_MODES, server_tls_context

logger = logging.getLogger(__name__)

_SPARE_CONNECTIONS = 256  # for requests that do not queue: health, metrics, the console


@dataclass
class Service:
    """A built app with its model, before it listens."""

    server: uvicorn.Server
    model: ModelService
    socket: socket.socket
    host: str
    port: int
    scheme: str = "http"  # https when serve.ssl_certfile is set

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def build_service(
    bundle: str | Path,
    *,
    config: ServeConfig,
    detector: DetectorSettings | None = None,
    stream: StreamConfig | None = None,
    images: ImageSettings | None = None,
) -> Service:
    """Load the bundle and bind the port (so `.port` is known before serving when it is 0).
    With serve.ssl_certfile, HTTPS only; its files are checked here (TLSSettingsError)."""
    tls = _tls_options(config)
    # The port first: a taken port fails at once, before seconds of model loading.
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # connections of such a socket; with it on, a response written in two parts waits for the
    # client's delayed ACK, 40 ms per request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError:
        sock.close()
        raise
    registry = CollectorRegistry()
    metrics = ServeMetrics(registry=registry)
    model = ModelService(bundle, config=config, metrics=metrics, detector=detector, images=images)
    app = create_app(
        model,
        config=config,
        registry=registry,
        metrics=metrics,
        stream=stream if config.live_alerts else None,
    )
    uvicorn_config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
        # A last bound on open connections, above what the batching queue admits (uvicorn
        # answers a plain 503 beyond it; the app's own 503 is JSON with Retry-After).
        limit_concurrency=config.max_queue_images + _SPARE_CONNECTIONS,
        backlog=2048,
        **tls,
    )
    server = uvicorn.Server(uvicorn_config)
    scheme = "https" if tls else "http"
    return Service(server, model, sock, config.host, int(sock.getsockname()[1]), scheme)


def _tls_options(config: ServeConfig) -> dict[str, Any]:
    """uvicorn's TLS options from the serve settings, after a check that the files load."""
    if not config.ssl_certfile:
        return {}
    password = (
        config.ssl_keyfile_password.get_secret_value() if config.ssl_keyfile_password else None
    )
    server_tls_context(
        setting="serve.ssl_certfile",
        certfile=config.ssl_certfile,
        keyfile=config.ssl_keyfile,
        password=password,
        client_cafile=config.ssl_ca_certs,
        client_auth=config.ssl_cert_reqs,
    )
    return {
        "ssl_certfile": config.ssl_certfile,
        "ssl_keyfile": config.ssl_keyfile,
        "ssl_keyfile_password": password,
        "ssl_ca_certs": config.ssl_ca_certs,
        "ssl_cert_reqs": VERIFY_MODES[config.ssl_cert_reqs],
    }


def serve_forever(service: Service) -> int:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers), then drain and stop."""
    logger.info(
        "serving model %s on %s: console %s/, API docs %s/docs",
        service.model.version, service.model.detector.device, service.url, service.url,
    )  # fmt: skip
    try:
        service.server.run(sockets=[service.socket])
    finally:
        service.model.close()
    return 0


class BackgroundServer:
    """The service in a daemon thread; `stop()` shuts it down."""

    def __init__(self, service: Service) -> None:
        self.service = service
        # uvicorn takes no signals outside the main thread: they stay with the caller.
        self._thread = threading.Thread(
            target=service.server.run,
            kwargs={"sockets": [service.socket]},
            name="http-service",
            daemon=True,
        )

    @property
    def url(self) -> str:
        return self.service.url

    def start(self, *, timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.service.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP service did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.service.server.should_exit = True
        self._thread.join(timeout=15)
        self.service.model.close()
