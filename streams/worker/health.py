"""/metrics, /healthz and /readyz on one port: prometheus_client's WSGI app behind a stdlib WSGI
server, dispatched by path, in a daemon thread. Optionally over TLS (each connection's handshake
in its own thread, bounded like its requests) and behind HTTP basic auth for everything but the
orchestrator's probes (/healthz, /readyz), as Prometheus' own web configuration does."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

logger = logging.getLogger(__name__)

# Readiness: () -> (ready, {check name: passed}); the worker supplies it.
ReadinessProbe = Callable[[], tuple[bool, dict[str, bool]]]
# Liveness: () -> (alive, details); /healthz answers 503 when not alive.
LivenessProbe = Callable[[], tuple[bool, dict[str, Any]]]
# Admin actions (POST /admin/..., off unless the worker supplies one): path -> (status, JSON).
AdminAction = Callable[[str], tuple[str, dict[str, Any]]]


def _always_alive() -> tuple[bool, dict[str, Any]]:
    return True, {}


class _BoundedWSGIServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, but at most `max_connections` of them, and none for longer than
    `connection_timeout_s`: a scrape or a probe sends its request at once and reads a small
    answer, so only a stalled or hostile client (half-sent requests, never reading) is cut off.
    Connections beyond the bound get a 503 at once instead of a thread."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64  # the listen backlog: a burst of connections is not dropped
    max_connections = 16
    connection_timeout_s = 5.0
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[Any, Any]:
        # The handshake waits for the client: not here, in the accepting thread, but in the
        # connection's own (finish_request), under the same deadline as its requests.
        request, client_address = super().get_request()
        if self.tls is not None:
            request = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        return request, client_address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(self.connection_timeout_s)
            try:
                request.do_handshake()
            except (OSError, ValueError) as exc:  # not TLS, a certificate refused, too slow
                logger.debug(
                    "metrics server: TLS handshake with %s failed: %s", client_address, exc
                )
                return
        super().finish_request(request, client_address)

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._deadlines: dict[socket.socket, float] = {}
        self._deadlines_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            logger.debug("metrics server: %d connections open, refusing one", self.max_connections)
            with contextlib.suppress(OSError):
                request.setblocking(False)  # never wait on a client that does not read
                request.send(_REFUSED)
            self.shutdown_request(request)
            return
        with self._deadlines_lock:
            self._deadlines[request] = time.monotonic() + self.connection_timeout_s
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request: Any) -> None:
        with self._deadlines_lock:
            if self._deadlines.pop(request, None) is not None:
                self._slots.release()

    def service_actions(self) -> None:
        """Called by serve_forever every poll interval: shut the sockets of connections past
        their deadline, which ends the blocked read or write of their thread."""
        super().service_actions()
        now = time.monotonic()
        with self._deadlines_lock:
            expired = [request for request, deadline in self._deadlines.items() if deadline < now]
        for request in expired:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or went away: not worth a traceback on stderr.
        logger.debug("metrics server: connection from %s failed", client_address, exc_info=True)


_REFUSED = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 15\r\n"
    b"Connection: close\r\n\r\ntoo many conns\n"
)


class _QuietHandler(WSGIRequestHandler):
    def setup(self) -> None:
        self.timeout = self.server.connection_timeout_s  # each read and write, at most
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)


_OPEN_PATHS = ("/healthz", "/readyz")  # the orchestrator's probes carry no credentials


def _authorized(environ: dict[str, Any], basic_auth: tuple[str, str]) -> bool:
    header = environ.get("HTTP_AUTHORIZATION", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    # Both compared in constant time, and both always: the answer's timing tells nothing.
    user_ok = hmac.compare_digest(user.encode(), basic_auth[0].encode())
    password_ok = hmac.compare_digest(password.encode(), basic_auth[1].encode())
    return user_ok and password_ok


def build_app(
    *,
    registry: CollectorRegistry,
    readiness: ReadinessProbe,
    liveness: LivenessProbe = _always_alive,
    admin: AdminAction | None = None,
    basic_auth: tuple[str, str] | None = None,
) -> Callable:
    """`basic_auth` (user, password): asked of every path but /healthz and /readyz."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if (
            basic_auth is not None
            and path not in _OPEN_PATHS
            and not _authorized(environ, basic_auth)
        ):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Basic realm="vaewatch"')],
            )
            return [b"unauthorized\n"]
        if admin is not None and path.startswith("/admin/"):
            if environ.get("REQUEST_METHOD") != "POST":
                start_response("405 Method Not Allowed", [("Allow", "POST")])
                return [b"use POST\n"]
            status, answer = admin(path)
            start_response(status, [("Content-Type", "application/json")])
            return [json.dumps(answer).encode() + b"\n"]
        if path == "/healthz":
            alive, details = liveness()
            if alive:
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok\n"]
            body = json.dumps({"alive": False, **details}).encode() + b"\n"
            start_response("503 Service Unavailable", [("Content-Type", "application/json")])
            return [body]
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
    """Serves the app on host:port (port 0 picks a free one; `.port` tells which); over TLS
    with `tls`, asking `basic_auth` (user, password) of all but the probes."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: ReadinessProbe,
        liveness: LivenessProbe = _always_alive,
        admin: AdminAction | None = None,
        tls: ssl.SSLContext | None = None,
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        app = build_app(
            registry=registry,
            readiness=readiness,
            liveness=liveness,
            admin=admin,
            basic_auth=basic_auth,
        )
        self._server = make_server(
            host, port, app, server_class=_BoundedWSGIServer, handler_class=_QuietHandler
        )
        self._server.tls = tls
        self.scheme = "https" if tls is not None else "http"
        self.host = host
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        logger.info(
            "metrics, /healthz and /readyz on %s://%s:%d", self.scheme, self.host, self.port
        )
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
