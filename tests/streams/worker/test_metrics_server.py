"""The worker's HTTP server (/metrics, /healthz, /readyz) under stalled and hostile clients: a
bounded number of threads, every connection closed by its deadline (issue 9, finding 7)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from streams.worker import health
from streams.worker.health import MetricsServer


class _ShortDeadlineServer(health._BoundedWSGIServer):
    connection_timeout_s = 3.0


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[MetricsServer]:
    # The same server with a 3 s deadline instead of 5 s.
    monkeypatch.setattr(health, "_BoundedWSGIServer", _ShortDeadlineServer)
    registry = CollectorRegistry()
    Counter("probe_total", "a series to scrape", registry=registry).inc()
    running = MetricsServer(
        host="127.0.0.1", port=0, registry=registry, readiness=lambda: (True, {})
    ).start()
    yield running
    running.stop()


def _get(server: MetricsServer, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _half_sent(server: MetricsServer, n: int) -> list[socket.socket]:
    """n connections that send the start of a request and then nothing."""
    sockets = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
        sockets.append(sock)
    return sockets


def _all_closed_by_server(sockets: list[socket.socket]) -> bool:
    """Each socket has an end of file to read (after a 503 for those refused at once)."""
    readable, _, _ = select.select(sockets, [], [], 0)
    if len(readable) < len(sockets):
        return False  # some still open, waiting for the rest of their request
    for sock in sockets:
        with contextlib.suppress(OSError):
            while sock.recv(4096):
                pass
    return True


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_idle_half_sent_requests_do_not_pin_a_thread_each(server: MetricsServer) -> None:
    assert _get(server, "/healthz")[0] == 200
    threads_before = threading.active_count()
    sockets = _half_sent(server, 200)
    try:
        time.sleep(0.3)  # let the server accept them all
        held = threading.active_count() - threads_before
        assert held <= _ShortDeadlineServer.max_connections, f"{held} threads for 200 idlers"
        # Past their deadline every one of them is closed and its thread is gone.
        assert _wait_for(lambda: _all_closed_by_server(sockets), timeout_s=8)
        assert _wait_for(lambda: threading.active_count() <= threads_before, timeout_s=3)
    finally:
        for sock in sockets:
            sock.close()
    status, body = _get(server, "/metrics")
    assert status == 200 and b"probe_total 1.0" in body


def test_connections_beyond_the_bound_get_a_503_at_once(server: MetricsServer) -> None:
    sockets = _half_sent(server, _ShortDeadlineServer.max_connections)
    try:
        time.sleep(0.3)
        # Refused at once: queued behind the idlers it would be served, after their deadline.
        assert _get(server, "/healthz")[0] == 503
        # Once the idlers are cut off at their deadline, probes are served again.
        assert _wait_for(lambda: _get(server, "/healthz")[0] == 200, timeout_s=8)
    finally:
        for sock in sockets:
            sock.close()
