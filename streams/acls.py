"""The Kafka ACLs each vaewatch client needs, derived from its settings (`vaewatch acls`).

Minimal on a broker with an authorizer (Apache Kafka's StandardAuthorizer, MSK, Confluent
Cloud, Strimzi's `simple` authorization): READ and WRITE imply DESCRIBE; since Kafka 3.0 WRITE
on any topic implies IDEMPOTENT_WRITE (KIP-679), so neither is listed. Topics are literal names;
the worker's default transactional id, `<group_id>-<host name>-<random>`, differs per
process, so it is granted as a prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from streams.config import StreamConfig

Client = Literal["worker", "produce", "serve", "recalibrate"]
CLIENTS: tuple[Client, ...] = ("worker", "produce", "serve", "recalibrate")
ResourceType = Literal["topic", "group", "transactional_id"]
Operation = Literal["read", "write", "create"]


class AclError(ValueError):
    """The ACLs cannot be derived (no principal). One line."""


@dataclass(frozen=True)
class AclSpec:
    """One ALLOW rule: `principal` may do `operation` on a resource, from any host."""

    principal: str
    resource_type: ResourceType
    name: str
    operation: Operation
    why: str
    pattern: Literal["literal", "prefixed"] = "literal"


def principal_of(config: StreamConfig, given: str | None = None) -> str:
    """`given` (User:NAME, or a bare NAME), else User:<sasl_username> for SASL. A client
    certificate's principal is what the broker's ssl.principal.mapping.rules make of its
    subject (the whole distinguished name by default), which only the broker knows."""
    if given:
        return given if ":" in given else f"User:{given}"
    if config.security_protocol.startswith("SASL") and config.sasl_username:
        return f"User:{config.sasl_username}"
    raise AclError(
        "name the principal with --principal (User:NAME): stream.sasl_username is not set "
        f"(security_protocol {config.security_protocol}); for mutual TLS it is what the broker "
        "makes of the client certificate's subject (the whole name by default, "
        "User:CN=worker,O=acme, or what its ssl.principal.mapping.rules make of it)"
    )


def client_acls(
    client: Client,
    config: StreamConfig,
    *,
    principal: str,
    shadow_topic: str = "",
    topic: str = "",
    create_topics: bool = False,
) -> list[AclSpec]:
    """What `client` needs with `config`: the worker (its group, input and output topics,
    exactly_once's transactional id), `vaewatch produce` (its topic: `topic` or the input;
    CREATE with `create_topics`, as `--partitions` does), the console's live alerts (`vaewatch
    serve`: the alert topic and the input topic it reads each alert's image back from) or
    `vaewatch recalibrate --data kafka:TOPIC` (`topic`, default the input)."""

    def acl(kind: ResourceType, name: str, operation: Operation, why: str, **kw) -> AclSpec:
        return AclSpec(principal, kind, name, operation, why, **kw)

    if client == "worker":
        specs = [
            acl("topic", config.input_topic, "read", "consume the images"),
            acl("group", config.group_id, "read", "join the consumer group, commit offsets"),
        ]
        outputs = {
            config.alert_topic: "publish alerts",
            config.scores_topic: "publish scores",
            config.dlq_topic: "publish dead letters",
            shadow_topic: "publish the shadow model's comparisons",
        }
        specs += [acl("topic", name, "write", why) for name, why in outputs.items() if name]
        if config.processing_guarantee == "exactly_once":
            tx_id, pattern = (
                (config.transactional_id, "literal")
                if config.transactional_id
                else (f"{config.group_id}-", "prefixed")
            )
            specs.append(
                acl("transactional_id", tx_id, "write", "run transactions", pattern=pattern)
            )
        return _deduplicated(specs)
    if client == "produce":
        target = topic or config.input_topic
        specs = [acl("topic", target, "write", "send the images")]
        if create_topics:
            specs.append(acl("topic", target, "create", "create the topic (--partitions)"))
        return specs
    if client == "serve":
        return _deduplicated(
            [
                acl("topic", config.alert_topic, "read", "follow the alerts"),
                acl("topic", config.input_topic, "read", "read each alert's image back"),
            ]
        )
    return [acl("topic", topic or config.input_topic, "read", "read the calibration images")]


def _deduplicated(specs: list[AclSpec]) -> list[AclSpec]:
    """One rule per resource and operation (the same topic may serve two purposes)."""
    seen: dict[tuple[str, str, str, str], AclSpec] = {}
    for spec in specs:
        key = (spec.resource_type, spec.name, spec.pattern, spec.operation)
        if key in seen:
            seen[key] = AclSpec(**{**seen[key].__dict__, "why": f"{seen[key].why}; {spec.why}"})
        else:
            seen[key] = spec
    return list(seen.values())


_KAFKA_ACLS_OPTION = {
    "topic": "--topic",
    "group": "--group",
    "transactional_id": "--transactional-id",
}


def kafka_acls_commands(
    specs: list[AclSpec], *, bootstrap_servers: str, command_config: str = "admin.properties"
) -> list[str]:
    """One `kafka-acls.sh --add` line per rule, run as an administrator."""
    lines = []
    for spec in specs:
        line = (
            f"kafka-acls.sh --bootstrap-server {bootstrap_servers} --command-config "
            f"{command_config} --add --allow-principal '{spec.principal}' --operation "
            f"{spec.operation.capitalize()} {_KAFKA_ACLS_OPTION[spec.resource_type]} {spec.name}"
        )
        if spec.pattern == "prefixed":
            line += " --resource-pattern-type prefixed"
        lines.append(f"{line}   # {spec.why}")
    return lines


_STRIMZI_TYPE = {"topic": "topic", "group": "group", "transactional_id": "transactionalId"}


def strimzi_acls(specs: list[AclSpec]) -> str:
    """The `spec.authorization` of a Strimzi KafkaUser (its principal is the KafkaUser)."""
    lines = ["authorization:", "  type: simple", "  acls:"]
    for spec in specs:
        lines += [
            f"    # {spec.why}",
            "    - resource:",
            f"        type: {_STRIMZI_TYPE[spec.resource_type]}",
            f"        name: {spec.name}",
            f"        patternType: {spec.pattern}",
            f"      operations: [{spec.operation.capitalize()}]",
        ]
    return "\n".join(lines)
