"""Every secret setting stays secret on the paths issue 30 added: the TLS and basic-auth
secrets of the HTTP endpoints and the Kafka key password are masked like the SASL password
(`vaewatch config`, log lines), and the one-line errors about a refusing broker never carry a
password even when the client library's own message does. The live tests check the worker's
log, metrics and /readyz with a wrong password (tests/streams/test_secured_failures.py)."""

from __future__ import annotations

import io
import logging

import pytest
import yaml
from kafka.errors import KafkaConnectionError, SaslAuthenticationFailedError

from streams.config import StreamConfig
from streams.connection_errors import (
    BrokerRefusedError,
    describe_connection_failure,
    describe_kafka_error,
    kafka_errors_in_one_line,
)
from vaewatch.cli import main
from vaewatch.config import ConfigError, load_settings, secret_keys
from vaewatch.secret_settings import mask_secrets_in_logs

VALUE = "S3cret #2024: [x"  # cut by YAML, split by shells: it must survive whole, unseen
NEW_SECRETS = {
    "stream.ssl_key_password",
    "serve.ssl_keyfile_password",
    "metrics.basic_auth_password",
}


def test_the_new_secret_settings_are_secrets() -> None:
    assert NEW_SECRETS | {"stream.sasl_password", "serve.bearer_token"} <= secret_keys()


def _env(key: str) -> str:
    return "VAEWATCH_" + key.replace(".", "__").upper()


@pytest.mark.parametrize("key", sorted(secret_keys()))
def test_each_secret_is_taken_verbatim_and_never_shown(key, capsys, monkeypatch) -> None:
    section, name = key.split(".")
    monkeypatch.setenv(_env(key), VALUE)
    if key == "metrics.basic_auth_password":  # valid only with its user name
        monkeypatch.setenv("VAEWATCH_METRICS__BASIC_AUTH_USERNAME", "prometheus")
    settings = load_settings(None)
    assert getattr(getattr(settings, section), name).get_secret_value() == VALUE
    assert main(["--config", "/dev/null", "config"]) == 0
    out = capsys.readouterr().out
    assert VALUE not in out and "S3cret" not in out
    assert yaml.safe_load(out)[section][name] == "**********"

    logger = logging.getLogger(f"test_masking_{name}")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        mask_secrets_in_logs(settings, logger)
        logger.warning("a library's configuration: %s", {name: VALUE})
    finally:
        logger.removeHandler(handler)
    assert VALUE not in stream.getvalue() and "**********" in stream.getvalue()


def test_a_section_error_does_not_echo_the_secret() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={"VAEWATCH_METRICS__BASIC_AUTH_PASSWORD": VALUE})
    assert "basic_auth_username" in str(info.value) and VALUE not in str(info.value)


CONFIG = StreamConfig(
    security_protocol="SASL_SSL",
    sasl_mechanism="SCRAM-SHA-512",
    sasl_username="worker",
    sasl_password=VALUE,
    ssl_key_password=VALUE + "-key",
)


def test_connection_errors_mask_a_password_the_library_put_in_its_message() -> None:
    for cause in (
        SaslAuthenticationFailedError(f"bad credentials {VALUE}"),
        KafkaConnectionError(f"odd failure mentioning {VALUE}-key"),
    ):
        message = describe_connection_failure(cause, CONFIG, timeout_ms=2000)
        assert VALUE not in message and "**********" in message, message
    assert VALUE not in describe_kafka_error(RuntimeError(f"x {VALUE}"), CONFIG)


def test_command_errors_mask_it_too() -> None:
    with pytest.raises(BrokerRefusedError) as info, kafka_errors_in_one_line(CONFIG, what="t"):
        raise KafkaConnectionError(f"refused {VALUE}")
    assert VALUE not in str(info.value) and str(info.value).startswith("t: ")
