"""Subcommand serve: the HTTP service and web console (owned by the serve work)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from vaewatch.config import Settings

if TYPE_CHECKING:
    from serve.server import BackgroundServer
    from streams.config import StreamConfig

logger = logging.getLogger(__name__)


class ServeError(Exception):
    """The service cannot start (e.g. its port is taken). One line."""


USER_ERRORS: tuple[type[Exception], ...] = (ServeError,)


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    from serve.server import build_service, serve_forever

    config = settings.serve
    if args.host is not None or args.port is not None:
        config = config.model_copy(
            update={
                "host": args.host if args.host is not None else config.host,
                "port": args.port if args.port is not None else config.port,
            }
        )
    if args.live_alerts:
        config = config.model_copy(update={"live_alerts": True})
    try:
        service = build_service(
            args.model,
            config=config,
            detector=settings.detector,
            stream=settings.stream,
            images=settings.images,
        )
    except OSError as exc:
        raise ServeError(f"cannot listen on {config.host}:{config.port} ({exc.strerror})") from None
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.bearer_token is None:
        logger.warning(
            "serving on %s without serve.bearer_token: anyone who reaches it may use it",
            config.host,
        )
    print(f"vaewatch serve: console {service.url}/  API docs {service.url}/docs", flush=True)
    return serve_forever(service)


def start_console(
    model: Path, settings: Settings, *, stream: StreamConfig, port: int = 0
) -> BackgroundServer:
    """The service and console in a background thread on 127.0.0.1, following the alert topic
    of `stream` (for `vaewatch demo`); `.url` is where it listens, `.stop()` ends it."""
    from serve.server import BackgroundServer, build_service

    config = settings.serve.model_copy(
        update={"host": "127.0.0.1", "port": port, "live_alerts": True}
    )
    service = build_service(
        model,
        config=config,
        detector=settings.detector,
        stream=stream,
        images=settings.images,
    )
    return BackgroundServer(service).start()


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="score, explain and generate over HTTP, with a web console",
        description="Serve the model bundle over HTTP (FastAPI on uvicorn): /v1/score, "
        "/v1/explain, /v1/sample, /v1/interpolate, /v1/model, /metrics, /healthz, /readyz, "
        "the console at /. Settings: the serve section.",
    )
    serve.add_argument("--model", type=Path, required=True, help="bundle directory")
    serve.add_argument("--host", default=None, help="default: serve.host (127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="default: serve.port")
    serve.add_argument(
        "--live-alerts",
        action="store_true",
        help="follow stream.alert_topic in the console (same as serve.live_alerts=true)",
    )
    serve.set_defaults(run=run_serve)
