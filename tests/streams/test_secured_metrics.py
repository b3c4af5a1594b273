"""The worker's metrics endpoint over TLS and behind basic auth (metrics.tls_*, metrics.
basic_auth_*, in the manner of Prometheus' own web configuration): Prometheus scrapes /metrics
with the CA and the credentials, the orchestrator's probes need neither, and a TLS client that
never completes its handshake holds no other scrape up."""

from __future__ import annotations

import base64
import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from streams.config import MetricsConfig
from streams.tls import TLSSettingsError
from streams.worker.health import MetricsServer
from streams.worker_process import metrics_basic_auth, metrics_tls
from tests.kafka_certs import https_files
from vaewatch.cli import main

USER, PASSWORD = "prometheus", "scr4pe #secret"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return https_files(tmp_path_factory.mktemp("metrics-tls"), server="worker", client="prometheus")


def _server(certs: dict[str, Path], **settings) -> MetricsServer:
    config = MetricsConfig(
        host="127.0.0.1",
        port=0,
        tls_cert_file=str(certs["cert"]),
        tls_key_file=str(certs["key"]),
        basic_auth_username=USER,
        basic_auth_password=PASSWORD,
        **settings,
    )
    registry = CollectorRegistry()
    Counter("probe_total", "a series to scrape", registry=registry).inc()
    return MetricsServer(
        host="127.0.0.1",
        port=0,
        registry=registry,
        readiness=lambda: (True, {"model_loaded": True}),
        admin=lambda path: ("200 OK", {"path": path}),
        tls=metrics_tls(config),
        basic_auth=metrics_basic_auth(config),
    ).start()


@pytest.fixture
def server(certs) -> Iterator[MetricsServer]:
    running = _server(certs)
    yield running
    running.stop()


def _request(
    server: MetricsServer,
    path: str,
    context: ssl.SSLContext | None,
    *,
    auth: tuple[str, str] | None = None,
    method: str = "GET",
) -> tuple[int, bytes, dict]:
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(
        f"https://127.0.0.1:{server.port}{path}", headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as answer:
            return answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_scrapes_need_the_credentials_probes_do_not(server, certs) -> None:
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    status, _, headers = _request(server, "/metrics", context)
    assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="vaewatch"'
    assert _request(server, "/metrics", context, auth=(USER, "wrong"))[0] == 401
    assert _request(server, "/metrics", context, auth=("someone", PASSWORD))[0] == 401
    status, body, _ = _request(server, "/metrics", context, auth=(USER, PASSWORD))
    assert status == 200 and b"probe_total 1.0" in body
    assert _request(server, "/healthz", context)[0] == 200
    assert _request(server, "/readyz", context)[0] == 200
    # The admin actions (a hot reload) are behind the credentials too.
    assert _request(server, "/admin/reload", context, method="POST")[0] == 401
    assert (
        _request(server, "/admin/reload", context, auth=(USER, PASSWORD), method="POST")[0] == 200
    )


def test_plain_http_and_unknown_cas_get_nothing(server, certs) -> None:
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _request(server, "/healthz", ssl.create_default_context())


def test_client_certificates_when_a_client_ca_is_set(certs) -> None:
    server = _server(certs, tls_client_ca_file=str(certs["ca"]))
    try:
        context = ssl.create_default_context(cafile=str(certs["ca"]))
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            _request(server, "/healthz", context)
        context.load_cert_chain(str(certs["client_cert"]), str(certs["client_key"]))
        assert _request(server, "/metrics", context, auth=(USER, PASSWORD))[0] == 200
    finally:
        server.stop()


def test_a_client_that_never_handshakes_holds_no_scrape_up(server, certs) -> None:
    """The handshake runs in the connection's own thread: a scrape right after a connection
    that sends nothing is answered at once, not after that connection's deadline."""
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(3)]
    try:
        context = ssl.create_default_context(cafile=str(certs["ca"]))
        started = time.monotonic()
        assert _request(server, "/healthz", context)[0] == 200
        assert time.monotonic() - started < 2.0  # the connections' deadline is 5 s
    finally:
        for sock in silent:
            sock.close()


def test_files_it_cannot_use_are_one_line(certs, trained_bundle, capsys) -> None:
    with pytest.raises(TLSSettingsError, match=r"metrics\.tls_cert_file: cannot read /no/such"):
        metrics_tls(MetricsConfig(tls_cert_file="/no/such.crt"))
    # `vaewatch worker` stops before it connects to anything, with that line.
    args = ["--set", f"metrics.tls_cert_file={certs['cert']}"]
    args += ["--set", f"metrics.tls_key_file={certs['client_key']}"]  # another certificate's
    assert main([*args, "worker", "--model", str(trained_bundle)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert re.match(
        r"vaewatch: error: metrics\.tls_cert_file: \S+ with its key does not load", line
    )


def test_basic_auth_needs_both_halves() -> None:
    with pytest.raises(ValueError, match="set both basic_auth_username and basic_auth_password"):
        MetricsConfig(basic_auth_username=USER)
