"""Subcommand acls: the Kafka ACLs a vaewatch client needs, derived from the settings
(streams.acls), as kafka-acls.sh commands or a Strimzi KafkaUser's authorization."""

from __future__ import annotations

import argparse

from streams.acls import (
    CLIENTS,
    AclError,
    client_acls,
    kafka_acls_commands,
    principal_of,
    strimzi_acls,
)
from vaewatch.config import Settings

USER_ERRORS: tuple[type[Exception], ...] = (AclError,)


def run_acls(args: argparse.Namespace, settings: Settings) -> int:
    stream = settings.stream
    principal = principal_of(stream, args.principal)
    specs = client_acls(
        args.client,
        stream,
        principal=principal,
        shadow_topic=settings.lifecycle.shadow_topic,
        topic=args.topic or "",
        create_topics=args.create_topics,
    )
    what = f"vaewatch {args.client}"
    if args.client == "worker":
        what += f" ({stream.processing_guarantee.replace('_', '-')})"
    print(f"# The ACLs {principal} needs as {what}, from the settings; nothing else.")
    if args.format == "strimzi":
        print(strimzi_acls(specs))
    else:
        print("\n".join(kafka_acls_commands(specs, bootstrap_servers=stream.bootstrap_servers)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    acls = subparsers.add_parser(
        "acls",
        help="print the Kafka ACLs a vaewatch client needs (kafka-acls.sh or Strimzi)",
        description="Derive the minimal ACL set of a vaewatch client from the settings (topics, "
        "group, processing guarantee, shadow topic) and print it as kafka-acls.sh commands "
        "to run as an administrator, or as a Strimzi KafkaUser's spec.authorization "
        "(docs/secured-kafka.md).",
    )
    acls.add_argument(
        "--client",
        choices=CLIENTS,
        default="worker",
        help="worker (default); produce (vaewatch produce); serve (the console's live "
        "alerts); recalibrate (vaewatch recalibrate --data kafka:TOPIC)",
    )
    acls.add_argument(
        "--principal",
        default=None,
        help="User:NAME (default: User:<stream.sasl_username>; for mutual TLS, what the "
        "broker maps the client certificate to)",
    )
    acls.add_argument(
        "--topic",
        default=None,
        help="produce and recalibrate: the topic (default: stream.input_topic)",
    )
    acls.add_argument(
        "--create-topics",
        action="store_true",
        help="produce: also CREATE on the topic (vaewatch produce --partitions creates it)",
    )
    acls.add_argument("--format", choices=["kafka-acls", "strimzi"], default="kafka-acls")
    acls.set_defaults(run=run_acls)
