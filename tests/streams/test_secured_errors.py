"""The one-line causes of streams.connection_errors for failures the live tests do not stage
(tests/streams/test_secured_failures.py stages the common ones on a real secured broker): each
from the exception kafka-python 3.0.12 reports, as recorded by the clients."""

from __future__ import annotations

import ssl

import pytest
from kafka.errors import (
    GroupAuthorizationFailedError,
    InvalidReceiveError,
    KafkaConnectionError,
    SaslAuthenticationFailedError,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
)

from streams.config import StreamConfig
from streams.connection_errors import (
    ConnectionFailures,
    describe_connection_failure,
    describe_kafka_error,
)

SASL = StreamConfig(
    bootstrap_servers="b:9093",
    security_protocol="SASL_SSL",
    sasl_mechanism="SCRAM-SHA-512",
    sasl_username="w",
    sasl_password="a password",
)
PLAIN = StreamConfig(bootstrap_servers="b:9093")
SSL = StreamConfig(bootstrap_servers="b:9093", security_protocol="SSL")
DISCONNECTED = KafkaConnectionError("socket disconnected")


def _recorded(*failures: tuple[BaseException, int]) -> BaseException | None:
    recorder = ConnectionFailures()
    for exc, requests_sent in failures:
        recorder.record(exc, requests_sent)
    return recorder.cause


def _handshake_failed(reason: str) -> KafkaConnectionError:
    """What kafka-python raises for a failed handshake: the ssl error as its context."""
    try:
        try:
            raise ssl.SSLError(1, reason)
        except ssl.SSLError as exc:
            raise KafkaConnectionError(f"Handshake failed: {exc}") from None
    except KafkaConnectionError as wrapped:
        return wrapped


@pytest.mark.parametrize(
    ("config", "failures", "says"),
    [
        (
            SASL,
            [(DISCONNECTED, 4), (SaslAuthenticationFailedError("bad creds"), 4), (DISCONNECTED, 4)],
            "SASL authentication of user 'w' (SCRAM-SHA-512) failed: wrong user name or "
            "password? (the broker says: bad creds)",
        ),
        (
            SASL,
            [(DISCONNECTED, 4), (DISCONNECTED, 1)],
            "failed: the broker closed the connection during the exchange",
        ),
        (SASL, [(DISCONNECTED, 2)], "the listener does not accept SASL mechanism SCRAM-SHA-512"),
        (SASL, [(UnsupportedSaslMechanismError(), 2)], "does not accept SASL mechanism"),
        (PLAIN, [(DISCONNECTED, 1)], "if the listener uses TLS, set stream.security_protocol"),
        (
            PLAIN,
            [(InvalidReceiveError("Invalid frame length: 352518912"), 1)],
            "the listener speaks TLS but stream.security_protocol is PLAINTEXT",
        ),
        (
            SSL,
            [(_handshake_failed("[SSL: WRONG_VERSION_NUMBER] wrong version number"), 0)],
            "the listener does not speak TLS (wrong version number)",
        ),
        (SSL, [(DISCONNECTED, -2)], "does the listener expect SASL? set stream.security_protocol"),
        (SSL, [(KafkaConnectionError("111 ECONNREFUSED"), 0)], "connection refused"),
        (SSL, [], "no answer within 2000 ms"),
    ],
    ids=[
        "SASL refused, with the broker's word",
        "SASL refused, only the close",
        "mechanism refused, only the close",
        "mechanism refused",
        "plaintext to TLS, closed",
        "plaintext to TLS, an alert read as a frame",
        "TLS to plaintext",
        "no SASL to a SASL listener",
        "refused",
        "nothing at all",
    ],
)
def test_the_most_telling_cause_in_one_line(config, failures, says) -> None:
    message = describe_connection_failure(_recorded(*failures), config, timeout_ms=2000)
    assert message.startswith(f"cannot connect to Kafka at b:9093 ({config.security_protocol}): ")
    assert says in message and "\n" not in message, message


def test_authorization_errors_name_the_resource_and_the_grant() -> None:
    topic = describe_kafka_error(TopicAuthorizationFailedError({"images"}), SASL, operation="READ")
    assert topic.startswith("not authorized for topic images (TopicAuthorizationFailedError)")
    assert "grant User:w READ on it" in topic
    group = describe_kafka_error(GroupAuthorizationFailedError("vaewatch"), SASL)
    assert group.startswith("not authorized for consumer group 'vaewatch'")
    mtls = StreamConfig(security_protocol="SSL", ssl_certfile="c.crt", ssl_keyfile="c.key")
    assert "grant the principal of stream.ssl_certfile" in describe_kafka_error(
        TopicAuthorizationFailedError("images"), mtls
    )
