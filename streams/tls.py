"""TLS contexts from certificate and key files, checked when a process starts: for vaewatch's
own HTTP endpoints (the worker's metrics endpoint, `vaewatch serve`) and for its Kafka clients
(whose files kafka-python loads only inside its I/O thread, at every connection attempt). A
wrong path, a key that does not match its certificate or a wrong key password is one line
naming the setting, not a traceback from inside a server thread or a bootstrap timeout."""

from __future__ import annotations

import ssl
from typing import Any, Literal

ClientAuth = Literal["none", "optional", "required"]
VERIFY_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class TLSSettingsError(ValueError):
    """A certificate, key or CA file of an HTTP endpoint cannot be used. One line."""


def server_tls_context(
    *,
    setting: str,
    certfile: str,
    keyfile: str | None = None,
    password: str | None = None,
    client_cafile: str | None = None,
    client_auth: ClientAuth = "none",
) -> ssl.SSLContext:
    """A TLS 1.2+ server context; `setting` names the certificate's setting in errors
    (e.g. metrics.tls_cert_file)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile, _no_prompt(password))
    except OSError as exc:
        hint = (
            "a PEM certificate and the private key that matches it (and that key's password, "
            "if it is encrypted)?"
        )
        raise _error(setting, certfile, exc, "with its key does not load", hint) from None
    if client_cafile:
        try:
            context.load_verify_locations(cafile=client_cafile)
        except OSError as exc:
            raise _error(
                setting, client_cafile, exc, "is no CA bundle", "PEM certificates?"
            ) from None
    context.verify_mode = VERIFY_MODES[client_auth]
    return context


def check_client_tls_files(
    *,
    prefix: str,
    cafile: str | None,
    certfile: str | None,
    keyfile: str | None,
    password: str | None,
) -> None:
    """Load a client's CA bundle and certificate with its key as kafka-python will; raises
    TLSSettingsError naming `prefix` + the setting (e.g. stream.ssl_cafile)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        try:
            context.load_verify_locations(cafile=cafile)
        except OSError as exc:
            raise _error(f"{prefix}ssl_cafile", cafile, exc, "is no CA bundle", "PEM?") from None
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile, _no_prompt(password))
        except OSError as exc:
            hint = (
                f"a PEM certificate, its private key in {prefix}ssl_keyfile (or in the same "
                f"file) and, for an encrypted key, its password in {prefix}ssl_key_password?"
            )
            problem = "with its key does not load"
            raise _error(f"{prefix}ssl_certfile", certfile, exc, problem, hint) from None


def _no_prompt(password: str | None) -> Any:
    """The key's password; without one, an empty one: OpenSSL would otherwise ask for it on the
    terminal (and block) when the key is encrypted."""
    return password if password is not None else (lambda: "")


def _error(setting: str, path: str, exc: OSError, problem: str, hint: str) -> TLSSettingsError:
    if not isinstance(exc, ssl.SSLError):
        return TLSSettingsError(f"{setting}: cannot read {exc.filename or path} ({exc.strerror})")
    return TLSSettingsError(f"{setting}: {path} {problem} ({exc.reason or exc}): {hint}")
