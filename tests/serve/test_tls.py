"""`vaewatch serve` over HTTPS (serve.ssl_*, uvicorn's TLS options): the bearer token over
TLS, plain HTTP refused, client certificates when asked for, and files it cannot use named in
one line before anything starts. Certificates are made at test time (tests/kafka_certs.py)."""

from __future__ import annotations

import json
import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.kafka_certs import https_files
from vaewatch.cli import main

TOKEN = "t0ken over TLS"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return https_files(tmp_path_factory.mktemp("https"), server="serve", client="console user")


def _context(certs: dict[str, Path], *, cafile: str = "ca", client: bool = False):
    context = ssl.create_default_context(cafile=str(certs[cafile]))
    if client:
        context.load_cert_chain(str(certs["client_cert"]), str(certs["client_key"]))
    return context


def _get(url: str, *, context: ssl.SSLContext, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_https_with_the_bearer_token(start_service, trained_bundle, certs) -> None:
    server = start_service(
        trained_bundle,
        bearer_token=TOKEN,
        ssl_certfile=str(certs["cert"]),
        ssl_keyfile=str(certs["key"]),
    )
    assert server.url.startswith("https://127.0.0.1:")
    context = _context(certs)
    assert _get(f"{server.url}/readyz", context=context)[0] == 200  # probes: no token
    assert _get(f"{server.url}/v1/model", context=context)[0] == 401
    assert _get(f"{server.url}/v1/model", context=context, token="wrong")[0] == 401
    status, body = _get(f"{server.url}/v1/model", context=context, token=TOKEN)
    assert status == 200 and "threshold" in json.loads(body)
    # A client that does not trust the service's CA is refused by its own TLS check...
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _get(f"{server.url}/readyz", context=_context(certs, cafile="other_ca"))
    # ...and plain HTTP gets no answer from a TLS port.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(server.url.replace("https", "http") + "/readyz", timeout=10)


def test_client_certificates_when_required(start_service, trained_bundle, certs) -> None:
    server = start_service(
        trained_bundle,
        ssl_certfile=str(certs["cert"]),
        ssl_keyfile=str(certs["key"]),
        ssl_ca_certs=str(certs["ca"]),
        ssl_cert_reqs="required",
    )
    assert _get(f"{server.url}/readyz", context=_context(certs, client=True))[0] == 200
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        _get(f"{server.url}/readyz", context=_context(certs))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            ["serve.ssl_certfile=/no/such.crt"],
            r"serve\.ssl_certfile: cannot read /no/such\.crt \(No such file or directory\)",
        ),
        (
            ["serve.ssl_certfile={cert}", "serve.ssl_keyfile={client_key}"],
            r"serve\.ssl_certfile: \S+server\.crt with its key does not load",
        ),
        (["serve.ssl_keyfile={key}"], r"serve: .*ssl_keyfile and ssl_ca_certs need ssl_certfile"),
    ],
    ids=["missing file", "key of another certificate", "key without certificate"],
)
def test_files_it_cannot_use_are_one_line(certs, trained_bundle, capsys, settings, message) -> None:
    """Checked before the port is bound or the model loaded; `vaewatch serve` in this process."""
    args = [a for s in settings for a in ("--set", s.format(**certs))]
    assert main([*args, "serve", "--model", str(trained_bundle), "--port", "0"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("vaewatch: error: ") and re.search(message, line), line
