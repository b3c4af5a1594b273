"""Why a Kafka client could not connect or was refused, in one line a user can act on.

kafka-python retries a failed connection until its bootstrap times out and then raises only
`KafkaTimeoutError('Unable to bootstrap')`; the cause (a wrong password, a certificate the
client or the broker does not accept, a listener that speaks another protocol) goes to its log.
The clients of streams.kafka_io record each failed connection (streams.client_internals.
recording_kafka_client) and raise BrokerConnectionError with the most telling cause instead.
Authorization errors (a missing ACL) are named with the resource and the operation to grant.
The messages never hold the SASL password or the key password.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import re
import ssl
import threading
from collections.abc import Iterator

from kafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    InvalidReceiveError,
    KafkaError,
    KafkaTimeoutError,
    SaslAuthenticationFailedError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
    UnsupportedSaslMechanismError,
)

from streams.client_internals import certificate_dates
from streams.config import StreamConfig

MASK = "**********"
# What kafka-python's transports put in a failed TLS connection's message: '[SSL: REASON] ...'.
_SSL_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")
_VERIFY_FAILED = re.compile(r"certificate verify failed: ([^(]+?)\s*(?:\(_ssl\.c:\d+\))?$")
# The broker's TLS alert about the client's certificate (mutual TLS).
_CLIENT_CERT_ALERTS = {
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "certificate expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "certificate revoked",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "certificate required",
    "TLSV1_ALERT_UNKNOWN_CA": "unknown CA",
}


class _OwnMessage:
    """An error whose str() is its message alone (KafkaError's puts its class name first)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__  # type: ignore[attr-defined]


class BrokerConnectionError(_OwnMessage, KafkaTimeoutError):
    """No connection to the broker within the bootstrap timeout; the message (one line) says
    why. A KafkaTimeoutError, which is what kafka-python raises in its place."""


class BrokerRefusedError(_OwnMessage, KafkaError):
    """The broker refused what a command asked (a missing ACL, a record it does not take).
    The message, one line, says what and why."""


class ClosedDuringSaslError(KafkaError):
    """The broker closed the connection in the middle of the SASL exchange: what it does when
    it refuses the credentials (its refusal itself can be lost, streams.client_internals.
    recording_kafka_client says why)."""


class ClosedAfterSetupError(KafkaError):
    """The broker answered the connection's set-up, then closed it at its next request: what
    a SASL listener does with a client that skips SASL."""


class ClosedAtSaslHandshakeError(KafkaError):
    """The broker closed the connection at the SASL handshake: it refused the mechanism."""


class ClosedBeforeAnswerError(KafkaError):
    """The broker closed the connection before it answered the first request (ApiVersions):
    what a TLS listener does with a client that does not speak TLS."""


# ApiVersions, SaslHandshake, SaslAuthenticate: a connection that sent this many requests and
# never completed its set-up failed in the SASL exchange.
_SASL_EXCHANGE_REQUESTS = 3


class ConnectionFailures:
    """The most telling recent reason a client's connections failed: the broker's own error
    (SASL refused, TLS certificate problems, a protocol mismatch) outranks a connection closed
    during the SASL exchange (or after the set-up), which outranks one closed before the
    first answer, which outranks a refused or dropped connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cause: BaseException | None = None
        self._rank = -1

    def record(self, exc: BaseException, requests_sent: int = 0) -> None:
        """`requests_sent`: how many the connection sent before it failed; negative when it
        failed after a set-up that went through. A close further into the set-up says more."""
        disconnected = "disconnected" in str(exc)
        if _is_telling(exc):
            rank = 3
        elif requests_sent < 0 and disconnected:
            exc, rank = ClosedAfterSetupError(str(exc)), 2
        elif requests_sent >= _SASL_EXCHANGE_REQUESTS:
            exc, rank = ClosedDuringSaslError(str(exc)), 2
        elif requests_sent == _SASL_EXCHANGE_REQUESTS - 1 and disconnected:
            exc, rank = ClosedAtSaslHandshakeError(str(exc)), 2
        elif requests_sent == 1 and disconnected:
            exc, rank = ClosedBeforeAnswerError(str(exc)), 1
        else:
            rank = 0
        with self._lock:
            if rank >= self._rank:
                self._cause, self._rank = exc, rank

    @property
    def cause(self) -> BaseException | None:
        return self._cause


def _is_telling(exc: BaseException) -> bool:
    text = _chain_text(exc)
    return isinstance(
        exc, (SaslAuthenticationFailedError, UnsupportedSaslMechanismError, InvalidReceiveError)
    ) or bool(_SSL_REASON.search(text) or "certificate verify failed" in text)


def _chain_text(exc: BaseException) -> str:
    """The messages of an exception and the ones it was raised from or while handling."""
    parts, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(str(current))
        current = current.__cause__ or current.__context__
    return " | ".join(parts)


def _masked(text: str, config: StreamConfig) -> str:
    for secret in (config.sasl_password, config.ssl_key_password):
        if secret is not None and secret.get_secret_value():
            text = text.replace(secret.get_secret_value(), MASK)
    return text


def describe_connection_failure(
    cause: BaseException | None, config: StreamConfig, *, timeout_ms: int
) -> str:
    """One line: which brokers, with which security protocol, and why no connection came up."""
    where = f"cannot connect to Kafka at {config.bootstrap_servers} ({config.security_protocol})"
    if cause is None:
        why = (
            f"no answer within {timeout_ms} ms (a firewall that drops packets, a wrong address, "
            "or a broker too busy to answer)"
        )
    else:
        why = _why(cause, config)
    return _masked(f"{where}: {why}", config)


def _why(exc: BaseException, config: StreamConfig) -> str:
    text = _chain_text(exc)
    if isinstance(exc, SaslAuthenticationFailedError):
        return (
            f"SASL authentication of user {config.sasl_username!r} "
            f"({config.sasl_mechanism or 'PLAIN'}) failed: wrong user name or password? (the "
            f"broker says: {_broker_message(exc)})"
        )
    if isinstance(exc, ClosedDuringSaslError):
        return (
            f"SASL authentication of user {config.sasl_username!r} "
            f"({config.sasl_mechanism or 'PLAIN'}) failed: the broker closed the connection "
            "during the exchange (wrong user name or password?)"
        )
    if isinstance(exc, (UnsupportedSaslMechanismError, ClosedAtSaslHandshakeError)):
        return (
            f"the listener does not accept SASL mechanism {config.sasl_mechanism or 'PLAIN'} "
            "(the broker's sasl.enabled.mechanisms): check stream.sasl_mechanism"
        )
    if isinstance(exc, ClosedAfterSetupError):
        hint = (
            ": does the listener expect SASL? set stream.security_protocol to SASL_SSL and the "
            "sasl_* settings"
            if not config.security_protocol.startswith("SASL")
            else ""
        )
        return f"the broker closed the connection after its set-up{hint}"
    verify = _VERIFY_FAILED.search(text.split(" | ")[0]) or _VERIFY_FAILED.search(text)
    if verify:
        return _server_certificate(verify.group(1).strip(), config)
    reason = _SSL_REASON.search(text)
    if reason and reason.group(1) in _CLIENT_CERT_ALERTS:
        return _client_certificate(_CLIENT_CERT_ALERTS[reason.group(1)], config)
    if reason and reason.group(1) in ("WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING"):
        # A plaintext listener answers a TLS ClientHello with garbage, or by closing.
        return (
            "the TLS handshake failed: the listener does not speak TLS "
            f"({reason.group(1).lower().replace('_', ' ')}); check stream.security_protocol "
            "and the port"
        )
    if isinstance(exc, ClosedBeforeAnswerError) and not config.security_protocol.endswith("SSL"):
        return (
            "the broker closed the connection before answering its first request: if the "
            "listener uses TLS, set stream.security_protocol to SSL or SASL_SSL"
        )
    if isinstance(exc, ClosedBeforeAnswerError):
        return "the broker closed the connection before answering its first request"
    if isinstance(exc, InvalidReceiveError) and _looks_like_tls(text):
        return (
            "the listener speaks TLS but stream.security_protocol is "
            f"{config.security_protocol}: set it to SSL or SASL_SSL"
        )
    if isinstance(exc, ConnectionRefusedError) or re.search(
        "ECONNREFUSED|Connection refused", text
    ):
        return "connection refused: nothing listens there"
    return _named(exc)


def _named(exc: BaseException) -> str:
    """'ClassName: message', once (kafka-python's errors name their class themselves)."""
    text, name = str(exc), type(exc).__name__
    return text if text.startswith((name, "[Error")) else f"{name}: {text}"


def _broker_message(exc: BaseException) -> str:
    # kafka-python repeats the class name: "[Error 58] SaslAuthenticationFailedError: X: msg".
    return str(exc).rsplit(f"{type(exc).__name__}: ", 1)[-1]


def _looks_like_tls(text: str) -> bool:
    """A TLS record read as a Kafka frame: its length's first bytes are the TLS record type
    (0x15 alert, 0x16 handshake) and major version 3."""
    match = re.search(r"Invalid frame length: (\d+)", text)
    if match is None:
        return False
    length = int(match.group(1))
    return (length >> 24) in (0x15, 0x16) and (length >> 16) & 0xFF == 0x03


def _server_certificate(problem: str, config: StreamConfig) -> str:
    cafile = config.ssl_cafile or "the system's trust store (stream.ssl_cafile is not set)"
    if "expired" in problem:
        return f"the broker's TLS certificate has expired ({problem})"
    if "not yet valid" in problem:
        return f"the broker's TLS certificate is not valid yet ({problem}): check the clocks"
    if "mismatch" in problem or "not valid for" in problem:
        return (
            f"the broker's TLS certificate is not valid for the host name it was reached by "
            f"({problem}); use a name the certificate lists, in bootstrap_servers and the "
            "broker's advertised listeners"
        )
    if "issuer" in problem or "self-signed" in problem or "self signed" in problem:
        return (
            f"the broker's TLS certificate is not signed by a CA in {cafile} ({problem}); set "
            "stream.ssl_cafile to the CA that signed it"
        )
    return f"the broker's TLS certificate was not accepted ({problem})"


def _client_certificate(alert: str, config: StreamConfig) -> str:
    if not config.ssl_certfile:
        return (
            f"the broker asks for a client certificate (TLS alert: {alert}): set "
            "stream.ssl_certfile and stream.ssl_keyfile (mutual TLS)"
        )
    what = f"the broker refused the client certificate {config.ssl_certfile} (TLS alert: {alert})"
    dates = certificate_dates(config.ssl_certfile)
    if dates is not None:
        now = datetime.datetime.now(datetime.timezone.utc)
        not_before, not_after = (_cert_time(d) for d in dates)
        if not_after is not None and not_after < now:
            return f"{what}: it expired on {dates[1]}"
        if not_before is not None and now < not_before:
            return f"{what}: it is not valid before {dates[0]}"
    return f"{what}: it is not signed by a CA the broker trusts, or it was revoked"


def _cert_time(text: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromtimestamp(
            ssl.cert_time_to_seconds(text), datetime.timezone.utc
        )
    except ValueError:
        return None


# -- authorization: a missing ACL ------------------------------------------------------------


def describe_authorization_error(
    exc: BaseException, config: StreamConfig, *, operation: str | None = None
) -> str | None:
    """One line naming the refused resource and the ACL that would allow it (`operation` on
    a topic, when the caller knows which it needs); None when `exc` is no authorization
    error."""
    principal = (
        f"User:{config.sasl_username}"
        if config.security_protocol.startswith("SASL") and config.sasl_username
        else "the principal of stream.ssl_certfile"
        if config.ssl_certfile
        else "this client's principal"
    )
    if isinstance(exc, TopicAuthorizationFailedError):
        topics = _names(exc) or "a topic"
        grant = f"{operation} on it" if operation else "the ACLs it needs"
        return (
            f"not authorized for topic {topics} ({type(exc).__name__}): grant {principal} "
            f"{grant} (`vaewatch acls` lists them)"
        )
    if isinstance(exc, GroupAuthorizationFailedError):
        return (
            f"not authorized for consumer group {config.group_id!r} ({type(exc).__name__}): grant "
            f"{principal} READ on it (`vaewatch acls`)"
        )
    if isinstance(exc, TransactionalIdAuthorizationFailedError):
        return (
            f"not authorized for the transactional id ({type(exc).__name__}): grant {principal} "
            "WRITE on it (`vaewatch acls` for exactly_once)"
        )
    if isinstance(exc, ClusterAuthorizationFailedError) or (
        "ClusterAuthorizationFailedError" in str(exc) and "InitProducerId" in str(exc)
    ):
        return (
            "not authorized to produce (ClusterAuthorizationFailedError at InitProducerId): "
            f"grant {principal} WRITE on the topic (on Kafka 3.0 and later it implies the "
            "IDEMPOTENT_WRITE an idempotent producer needs)"
        )
    return None


def _names(exc: BaseException) -> str:
    """The topic names kafka-python puts in an authorization error (a set, as its argument)."""
    names: list[str] = []
    for arg in exc.args:
        if isinstance(arg, (set, frozenset, list, tuple)):
            names += sorted(str(n) for n in arg)
        elif isinstance(arg, str) and arg:
            names += re.findall(r"'([^']+)'", arg) or [n.strip() for n in arg.split(",")]
    return ", ".join(dict.fromkeys(names))


def describe_kafka_error(
    exc: BaseException, config: StreamConfig, *, operation: str | None = None
) -> str:
    """The one-line message of any Kafka client error: an authorization error with its
    resource (and the `operation` to grant on a topic, when the caller knows it), a connection
    error with its cause, else the exception itself (password masked)."""
    if isinstance(exc, BrokerConnectionError):
        return str(exc)
    text = describe_authorization_error(exc, config, operation=operation)
    return _masked(text if text is not None else _named(exc), config)


@contextlib.contextmanager
def kafka_errors_in_one_line(
    config: StreamConfig, *, what: str, operation: str | None = None
) -> Iterator[None]:
    """For a command: a Kafka error inside becomes BrokerRefusedError, one line naming `what`
    it was about and the cause (an error with a `cause` attribute, such as a count of failed
    sends, names that cause too; a refused topic, the `operation` to grant on it);
    BrokerConnectionError says why already and passes through."""
    try:
        yield
    except BrokerConnectionError:
        raise
    except KafkaError as exc:
        cause = getattr(exc, "cause", None)
        why = describe_kafka_error(cause or exc, config, operation=operation)
        prefix = f"{exc}: " if cause is not None else ""
        raise BrokerRefusedError(f"{what}: {prefix}{why}") from None


class _WithoutTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            record.exc_info, record.exc_text = None, None
        return True


def one_line_connection_logs() -> None:
    """kafka-python's transport logs a connection that failed after its TLS handshake (the
    broker refusing the client certificate) with a traceback, at every retry; vaewatch names
    the cause in one line itself, so below DEBUG those records keep only their message (which
    names the exception)."""
    transport = logging.getLogger("kafka.net.transport")
    if not any(isinstance(f, _WithoutTraceback) for f in transport.filters):
        transport.addFilter(_WithoutTraceback())
