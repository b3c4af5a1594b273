"""A secured Apache Kafka for the live security tests: one broker per test module.

One KRaft node (the jars `vaewatch broker --engine kafka` runs) with these listeners, all on
127.0.0.1:

- `SASL`: SASL_SSL with SCRAM-SHA-512; the users `admin` (a super user) and `worker` are
  created when the log dir is formatted (the storage tool's `--add-scram`);
- `MTLS`: SSL that requires a client certificate signed by the test CA (also the listener the
  broker talks to itself on, and the controller's listener is mutual TLS too);
- `EXPIRED` and `WRONGHOST`: SSL listeners whose server certificate has expired, or names
  another host, for the failure tests.

A certificate's principal is its common name (`ssl.principal.mapping.rules`), so the client
certificate CN=worker and the SCRAM user worker are the same principal, `User:worker`.
`StandardAuthorizer` refuses whatever no ACL allows; `grant()` adds ACLs (streams.acls' specs)
and returns once the broker enforces them. `vaewatch broker` stays plaintext: only this fixture
passes the security settings.
"""

from __future__ import annotations

import itertools
import json
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from kafka.admin import (
    ACL,
    ACLFilter,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    KafkaAdminClient,
    ResourcePattern,
    ResourcePatternFilter,
    ResourceType,
)

from serve.config import ServeConfig
from serve.server import BackgroundServer, build_service
from streams.acls import AclSpec
from streams.brokers.apache_kafka import KafkaBroker
from streams.brokers.local import free_port
from streams.config import StreamConfig
from streams.kafka_io import security_options
from tests.fixtures_broker import StreamTopics, make_topics
from tests.fixtures_model import CPU
from tests.kafka_certs import CertificateAuthority
from tests.streams.kafka_helpers import produce_values

__all__ = [
    "SecuredKafka",
    "first_alert_card",
    "secured_kafka",
    "start_secured_kafka",
    "stream_env",
    "use_stream_env",
]

Listener = Literal["sasl", "mtls"]
ADMIN = "admin"
WORKER = "worker"
# Characters YAML and shells would mangle: the tests check that it is never shown.
WORKER_PASSWORD = "w0rker S3cret #2026!"
ADMIN_PASSWORD = "admin-S3cret-2026"
_counter = itertools.count()


@dataclass
class SecuredKafka:
    broker: KafkaBroker
    folder: Path  # certificates and keys
    ports: dict[str, int]  # listener name (lower case) -> port

    def address(self, listener: str) -> str:
        return f"127.0.0.1:{self.ports[listener]}"

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.crt"

    def config(
        self, listener: Listener = "sasl", *, password: str = WORKER_PASSWORD, **overrides: Any
    ) -> StreamConfig:
        """Stream settings of the worker principal on `listener`: SCRAM-SHA-512 over TLS, or
        its client certificate (mutual TLS); `overrides` replace any of them."""
        security: dict[str, Any] = {"ssl_cafile": str(self.ca_file)}
        if listener == "sasl":
            security |= {
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": WORKER,
                "sasl_password": password,
            }
        else:
            security |= {
                "security_protocol": "SSL",
                "ssl_certfile": str(self.folder / "worker.crt"),
                "ssl_keyfile": str(self.folder / "worker.key"),
            }
        return StreamConfig(
            **({"bootstrap_servers": self.address(listener)} | security | overrides)
        )

    def admin_config(self) -> StreamConfig:
        return self.config(
            "sasl", sasl_username=ADMIN, password=ADMIN_PASSWORD, client_id="test-admin"
        )

    def admin(self) -> KafkaAdminClient:
        return KafkaAdminClient(
            bootstrap_servers=self.address("sasl"),
            client_id="test-admin",
            **security_options(self.admin_config()),
        )

    def topics(self, *, partitions: int = 1, **overrides: Any) -> StreamTopics:
        """Fresh topics and group, created by the admin; their config is the admin's."""
        security = {
            key: value
            for key, value in self.admin_config().model_dump().items()
            if key.startswith(("security_", "sasl_", "ssl_"))
        }
        return make_topics(self.broker, partitions=partitions, **security | overrides)

    def grant(self, specs: Iterable[AclSpec]) -> None:
        """Create the ACLs and wait until the broker's authorizer has them (KRaft: the
        controller commits them first, the broker applies its metadata a moment later)."""
        acls = [_acl(spec) for spec in specs]
        admin = self.admin()
        try:
            result = admin.create_acls(acls)
            if result["failed"]:
                raise RuntimeError(f"creating ACLs failed: {result['failed']}")
            deadline = time.monotonic() + 15
            while not all(_present(admin, acl) for acl in acls):
                if time.monotonic() > deadline:
                    raise TimeoutError("the broker does not enforce the new ACLs after 15 s")
                time.sleep(0.05)
        finally:
            admin.close()


_ENV_KEYS = (
    "bootstrap_servers",
    "security_protocol",
    "sasl_mechanism",
    "sasl_username",
    "sasl_password",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
)


def stream_env(config: StreamConfig) -> dict[str, str]:
    """The address and security settings of `config` as VAEWATCH_STREAM__* variables, for a
    `vaewatch` child (the password from the environment, as in production)."""
    env = {}
    for key in _ENV_KEYS:
        value = getattr(config, key)
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if value is not None:
            env[f"VAEWATCH_STREAM__{key.upper()}"] = str(value)
    return env


def use_stream_env(monkeypatch: pytest.MonkeyPatch, config: StreamConfig) -> None:
    """Set stream_env(config) in this test's environment, which `vaewatch` children inherit,
    and no other VAEWATCH_STREAM__ variable of ours."""
    for key in _ENV_KEYS:
        monkeypatch.delenv(f"VAEWATCH_STREAM__{key.upper()}", raising=False)
    for key, value in stream_env(config).items():
        monkeypatch.setenv(key, value)


def first_alert_card(
    bundle: Path, *, config: StreamConfig, producer_config: StreamConfig, timeout_s: float = 60
) -> dict[str, Any]:
    """Run `vaewatch serve` with live alerts on `config` (the console's principal), send one
    alert naming input offset 0 once it follows the alert topic (with `producer_config`), and
    return the card it shows for it."""
    service = build_service(
        bundle, config=ServeConfig(port=0, live_alerts=True), detector=CPU, stream=config
    )
    server = BackgroundServer(service).start()
    try:
        deadline = time.monotonic() + timeout_s
        while not _get_json(f"{server.url}/v1/alerts")["connected"]:
            assert time.monotonic() < deadline, "the console did not follow the alert topic"
            time.sleep(0.1)
        alert = {"topic": config.input_topic, "partition": 0, "offset": 0, "score": 1.0}
        produce_values(producer_config, [json.dumps(alert).encode()], topic=config.alert_topic)
        while not (recent := _get_json(f"{server.url}/v1/alerts")["recent"]):
            assert time.monotonic() < deadline, "no alert card"
            time.sleep(0.1)
    finally:
        server.stop()
    (card,) = recent
    return card


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.loads(answer.read())


def _acl(spec: AclSpec) -> ACL:
    return ACL(
        principal=spec.principal,
        host="*",
        operation=ACLOperation[spec.operation.upper()],
        permission_type=ACLPermissionType.ALLOW,
        resource_pattern=ResourcePattern(
            ResourceType[spec.resource_type.upper()],
            spec.name,
            ACLResourcePatternType[spec.pattern.upper()],
        ),
    )


def _present(admin: KafkaAdminClient, acl: ACL) -> bool:
    pattern = acl.resource_pattern
    found, _ = admin.describe_acls(
        ACLFilter(
            principal=acl.principal,
            host="*",
            operation=acl.operation,
            permission_type=acl.permission_type,
            resource_pattern=ResourcePatternFilter(
                pattern.resource_type, pattern.resource_name, pattern.pattern_type
            ),
        )
    )
    return bool(found)


def _write_certificates(folder: Path) -> None:
    """The test CA and every certificate the fixture and the failure tests use."""
    ca = CertificateAuthority()
    ca.write(folder / "ca.crt")
    hosts = ("127.0.0.1", "localhost")
    ca.issue("broker", hosts=hosts).write_keystore(folder / "broker.pem")
    ca.issue("broker", hosts=hosts, expired=True).write_keystore(folder / "broker-expired.pem")
    ca.issue("broker", hosts=("wrong-host.invalid",)).write_keystore(folder / "broker-wrong.pem")
    ca.issue(WORKER).write(folder, "worker")
    ca.issue(WORKER, expired=True).write(folder, "worker-expired")
    stranger = CertificateAuthority("another CA")
    stranger.write(folder / "other-ca.crt")
    stranger.issue(WORKER).write(folder, "worker-other-ca")


def _server_properties(folder: Path, ports: dict[str, int]) -> dict[str, object]:
    names = ("sasl", "mtls", "expired", "wronghost")
    protocols = {"sasl": "SASL_SSL", "mtls": "SSL", "expired": "SSL", "wronghost": "SSL"}
    advertised = ",".join(f"{n.upper()}://127.0.0.1:{ports[n]}" for n in names)
    controller = f"CONTROLLER://127.0.0.1:{ports['controller']}"
    protocol_map = ",".join(f"{n.upper()}:{protocols[n]}" for n in names)
    return {
        "listeners": f"{advertised},{controller}",
        "advertised.listeners": advertised,
        "listener.security.protocol.map": f"{protocol_map},CONTROLLER:SSL",
        "inter.broker.listener.name": "MTLS",
        "controller.listener.names": "CONTROLLER",
        "sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.sasl.scram-sha-512.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": folder / "broker.pem",
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": folder / "ca.crt",
        "listener.name.mtls.ssl.client.auth": "required",
        "listener.name.controller.ssl.client.auth": "required",
        "listener.name.expired.ssl.keystore.location": folder / "broker-expired.pem",
        "listener.name.wronghost.ssl.keystore.location": folder / "broker-wrong.pem",
        "ssl.principal.mapping.rules": "RULE:^CN=([^,]+),.*$/$1/,DEFAULT",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{ADMIN};User:broker",
        # Topics are created by their owners (here: the admin, or a vaewatch command that
        # holds CREATE), never on a client's first use.
        "auto.create.topics.enable": "false",
    }


def start_secured_kafka(folder: Path) -> SecuredKafka:
    folder.mkdir(parents=True, exist_ok=True)
    _write_certificates(folder)
    ports = {n: free_port() for n in ("sasl", "mtls", "expired", "wronghost", "controller")}
    scram = [
        f"SCRAM-SHA-512=[name={ADMIN},password={ADMIN_PASSWORD}]",
        f'SCRAM-SHA-512=[name={WORKER},password="{WORKER_PASSWORD}"]',
    ]
    admin = StreamConfig(
        bootstrap_servers=f"127.0.0.1:{ports['sasl']}",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=ADMIN,
        sasl_password=ADMIN_PASSWORD,
        ssl_cafile=str(folder / "ca.crt"),
    )
    broker = KafkaBroker(
        port=ports["sasl"],
        controller_port=ports["controller"],
        log_path=folder / "kafka.log",
        properties=_server_properties(folder, ports),
        format_args=[arg for user in scram for arg in ("--add-scram", user)],
        client_options=security_options(admin),
    )
    broker.start(timeout_s=120.0)
    return SecuredKafka(broker=broker, folder=folder, ports=ports)


@pytest.fixture(scope="module")
def secured_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredKafka]:
    """One secured Apache Kafka for the module's tests (see the module's docstring)."""
    secured = start_secured_kafka(tmp_path_factory.mktemp(f"secured-kafka-{next(_counter)}"))
    try:
        yield secured
    finally:
        secured.broker.stop()
