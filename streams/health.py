"""/metrics, /healthz and /readyz on one port: prometheus_client's WSGI app behind a stdlib WSGI
server, dispatched by path, in a daemon thread."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

logger = logging.getLogger(__name__)

# Readiness: () -> (ready, {check name: passed}); the worker supplies it.
ReadinessProbe = Callable[[], tuple[bool, dict[str, bool]]]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)


def build_app(*, registry: CollectorRegistry, readiness: ReadinessProbe) -> Callable:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ready, checks = readiness()
            body = json.dumps({"ready": ready, "checks": checks}).encode() + b"\n"
            status = "200 OK" if ready else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [body]
        if path in ("/metrics", "/"):
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    return app


class MetricsServer:
    """Serves the app on host:port (port 0 picks a free one; `.port` tells which)."""

    def __init__(
        self, *, host: str, port: int, registry: CollectorRegistry, readiness: ReadinessProbe
    ) -> None:
        app = build_app(registry=registry, readiness=readiness)
        self._server = make_server(
            host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.host = host
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        logger.info("metrics, /healthz and /readyz on http://%s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
