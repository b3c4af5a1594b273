"""The files of a one-node Apache Kafka broker: server.properties, the log4j 2 configuration,
the cluster id of its log dir, and the line of its log that says why it failed."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Mapping
from pathlib import Path

_ERROR_LINE = re.compile(r"\b(ERROR|FATAL)\b|^Error:|^Exception in thread")
_EXCEPTION_LINE = re.compile(r"^[\w.$]+(Exception|Error)\b")
_LOG_RECORD = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] ")  # how each log4j record starts
_PACKAGE = re.compile(r"^(?:[a-z_][\w]*\.)+")


def server_properties(
    *,
    host: str,
    port: int,
    controller_port: int,
    data_dir: Path,
    overrides: Mapping[str, object] | None = None,
) -> str:
    """server.properties of a one-node cluster: every internal topic with one replica, no
    rebalance delay, topics created on first use; `overrides` replace or add settings (the
    secured broker of the tests: its listeners, TLS, SASL and authorizer)."""
    advertised = "127.0.0.1" if host in ("", "0.0.0.0") else host
    settings: dict[str, object] = {
        "process.roles": "broker,controller",
        "node.id": 1,
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{advertised}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": data_dir,
        "num.partitions": 1,
        "auto.create.topics.enable": "true",
        "group.initial.rebalance.delay.ms": 0,
        # Kafka's floor is 6 s: a client may ask for less here, so that a test or a development
        # setup sees a killed member leave the group within a second or two.
        "group.min.session.timeout.ms": 1000,
        "offsets.topic.replication.factor": 1,
        # 50 partitions by default: creating them delays a cluster's first group or transaction.
        "offsets.topic.num.partitions": 4,
        "transaction.state.log.replication.factor": 1,
        "transaction.state.log.min.isr": 1,
        "transaction.state.log.num.partitions": 4,
        "share.coordinator.state.topic.replication.factor": 1,
        "share.coordinator.state.topic.min.isr": 1,
        # Two cores: Kafka's defaults (3 network, 8 I/O threads) are sized for servers.
        "num.network.threads": 2,
        "num.io.threads": 4,
        "num.recovery.threads.per.data.dir": 1,
    }
    settings.update(overrides or {})
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def log4j_properties(log_path: Path) -> str:
    return (
        "status = warn\n"
        "appender.file.type = File\n"
        "appender.file.name = FILE\n"
        f"appender.file.fileName = {log_path}\n"
        "appender.file.layout.type = PatternLayout\n"
        "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = INFO\n"
        "rootLogger.appenderRef.file.ref = FILE\n"
    )


def random_cluster_id() -> str:
    """A base64url UUID, as `kafka-storage.sh random-uuid` prints (never one starting with '-',
    which the tool's command line would take for an option)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def stored_cluster_id(data_dir: Path) -> str | None:
    """The cluster id of a log dir formatted before, if it was."""
    try:
        text = (data_dir / "meta.properties").read_text()
    except OSError:
        return None
    match = re.search(r"^cluster\.id=(\S+)$", text, re.MULTILINE)
    return match.group(1) if match else None


def last_error(log_text: str) -> str:
    """The log's last ERROR (or FATAL) line and the exception that says why: of the causes in
    its stack trace, the deepest one, or a shallower one that repeats its message with more
    context ('Socket server failed to bind to HOST:PORT: Address already in use')."""
    lines = log_text.splitlines()
    starts = [i for i, line in enumerate(lines) if _ERROR_LINE.search(line)]
    if not starts:
        tail = [line.strip() for line in lines if line.strip()]
        return tail[-1][:500] if tail else "the log is empty"
    block = [lines[starts[-1]]]
    for line in lines[starts[-1] + 1 :]:
        if _LOG_RECORD.match(line):
            break
        block.append(line)
    head = _LOG_RECORD.sub("", block[0]).strip()
    causes = [line.strip().removeprefix("Caused by: ") for line in block[1:]]
    causes = [cause for cause in causes if _EXCEPTION_LINE.match(cause)]
    if not causes:
        return head[:500]
    deepest = len(causes) - 1
    while deepest > 0 and ": " in causes[deepest]:
        message = causes[deepest].split(": ", 1)[1]
        if message not in causes[deepest - 1]:
            break
        deepest -= 1
    cause = _PACKAGE.sub("", causes[deepest])
    return f"{head}; cause: {cause}"[:500]
