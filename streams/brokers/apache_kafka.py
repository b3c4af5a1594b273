"""A real single-node Apache Kafka broker (KRaft, broker and controller in one JVM) for
`vaewatch broker --engine kafka`, the live tests and the benchmarks.

Its data lives in a temporary folder that stop() removes. The JVM runs with a bounded heap and
logs to a file (server.log beside the data, or `log_path`); every start-up failure is one
BrokerError line naming the cause and that file, and leaves no JVM behind.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from subprocess import DEVNULL
from typing import IO, Any

from streams.brokers.kafka_files import (
    last_error,
    log4j_properties,
    random_cluster_id,
    server_properties,
    stored_cluster_id,
)
from streams.brokers.kafka_jars import KafkaJars, find_jars, find_java, kafka_version
from streams.brokers.local import BrokerError, BrokerProcess, free_port, port_in_use

logger = logging.getLogger(__name__)

# Serial GC and a bounded heap: one small broker on a 2-core machine shared with the worker.
# 512 MiB of heap is ample for test and benchmark traffic; the JVM's resident size stays
# around 350-450 MB.
JVM_OPTIONS = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
READY_LINE = b"Kafka Server started"
_DAMAGED_JARS = re.compile(
    r"ZipException|invalid LOC header|zip END header|error in opening zip file|zip file is empty"
    r"|NoClassDefFoundError|Could not find or load main class"
)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. If the Python process dies without stop() (kill
    # -9, a crash), the kernel sends the JVM SIGTERM, so no orphaned broker keeps its ports.
    # The signal follows the *thread* that forked, so start the broker from a long-lived one.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# Bound before any fork: the child runs only this one foreign call.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class KafkaBroker(BrokerProcess):
    """One Apache Kafka JVM listening on host:port (`port=0`: a free one). Use as a context
    manager or call start() and stop(). `kafka_home` or KAFKA_HOME points at an unpacked
    release; otherwise the pinned jars are fetched into the user's cache on first use.

    Plaintext unless told otherwise: `properties` replace or add server.properties settings
    (listeners, TLS, SASL, an authorizer), `format_args` go to the storage tool's format (such
    as `--add-scram`), and `client_options` are the kafka-python security options with which
    the start-up check reaches the listener on `port`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        controller_port: int = 0,
        log_path: Path | None = None,
        work_dir: Path | None = None,
        kafka_home: Path | None = None,
        java: str | None = None,
        properties: Mapping[str, object] | None = None,
        format_args: Sequence[str] = (),
        client_options: Mapping[str, Any] | None = None,
    ):
        self.host = host
        self.port = port or free_port(host)
        # Not checked before the start like `port`: a taken one fails the JVM, which says so.
        self.controller_port = controller_port
        self.log_path = log_path
        self._given_log_path = log_path
        self._given_work_dir = work_dir
        self._kafka_home = kafka_home
        self._java_path = java
        self._properties = dict(properties or {})
        self._format_args = tuple(format_args)
        self._client_options = dict(client_options or {})
        self._work_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_start = 0  # where this start's lines begin in a log file given to append to

    @property
    def description(self) -> str:
        return f"Apache Kafka {kafka_version()} (KRaft, one node)"

    @property
    def work_dir(self) -> Path | None:
        """The folder of its configuration and data (and log) while it runs."""
        return self._work_dir

    def start(self, *, timeout_s: float = 90.0) -> KafkaBroker:
        """Format the log dir and start the JVM; return once it answers Kafka requests.
        `timeout_s` bounds the JVMs' part; a first fetch of the jars has a bound of its own."""
        if port_in_use(self.host, self.port):
            raise BrokerError(f"port {self.host}:{self.port} is already in use")
        java = find_java(self._java_path)
        jars = find_jars(self._kafka_home)
        deadline = time.monotonic() + timeout_s
        try:
            self._prepare_files()
            self._format(java, jars, deadline)
            self._launch(java, jars)
            self._wait_ready(jars, deadline)
        except BaseException:
            self._abort()
            raise
        atexit.register(self.stop)
        logger.info(
            "Kafka %s on %s (pid %d), log %s",
            kafka_version(),
            self.bootstrap_servers,
            self.pid,
            self.log_path,
        )
        return self

    def _prepare_files(self) -> None:
        self._work_dir = self._given_work_dir or Path(tempfile.mkdtemp(prefix="vaewatch-kafka-"))
        self._work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self._given_log_path or self._work_dir / "server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.controller_port = self.controller_port or free_port("127.0.0.1")
        data = self._work_dir / "data"
        properties = server_properties(
            host=self.host,
            port=self.port,
            controller_port=self.controller_port,
            data_dir=data,
            overrides=self._properties,
        )
        (self._work_dir / "server.properties").write_text(properties)
        (self._work_dir / "log4j2.properties").write_text(log4j_properties(self.log_path))
        # Both the JVM's own output and log4j's appender write to the log file (O_APPEND).
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_start = self._log_file.tell()

    def _java(self, java: str, jars: KafkaJars, *main_and_args: str) -> list[str]:
        assert self._work_dir is not None
        log4j = f"-Dlog4j2.configurationFile={self._work_dir / 'log4j2.properties'}"
        return [java, *JVM_OPTIONS, log4j, "-cp", jars.classpath, *main_and_args]

    def _format(self, java: str, jars: KafkaJars, deadline: float) -> None:
        assert self._work_dir is not None
        # --ignore-formatted and the same cluster id: a work_dir given again keeps its data.
        tool = ["kafka.tools.StorageTool", "format", "--ignore-formatted", "-t"]
        cluster_id = stored_cluster_id(self._work_dir / "data") or random_cluster_id()
        properties = str(self._work_dir / "server.properties")
        command = self._java(java, jars, *tool, cluster_id, "-c", properties, *self._format_args)
        timeout_s = max(deadline - time.monotonic(), 1.0)
        try:
            code = subprocess.run(
                command,
                stdin=DEVNULL,
                stdout=self._log_file,
                stderr=self._log_file,
                timeout=timeout_s,
            ).returncode
        except subprocess.TimeoutExpired:
            raise BrokerError(f"formatting the log dir timed out; log: {self.log_path}") from None
        if code != 0:
            raise self._failure(jars, f"formatting the log dir failed (exit code {code})")

    def _launch(self, java: str, jars: KafkaJars) -> None:
        assert self._work_dir is not None
        properties = str(self._work_dir / "server.properties")
        self._process = subprocess.Popen(
            self._java(java, jars, "kafka.Kafka", properties),
            stdin=DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            # Its own session: a terminal's Ctrl-C reaches only Python, which stops the JVM in
            # order (stop()), instead of both shutting down at once.
            start_new_session=True,
            preexec_fn=_die_with_parent if _LIBC is not None else None,
        )

    def _wait_ready(self, jars: KafkaJars, deadline: float) -> None:
        """Until the log says the server started and it answers a metadata request."""
        assert self._process is not None and self.log_path is not None
        with open(self.log_path, "rb") as log:
            log.seek(self._log_start)
            seen = b""
            while READY_LINE not in seen:
                if self._process.poll() is not None:
                    code = self._process.returncode
                    raise self._failure(jars, f"the Kafka JVM exited with code {code} on start-up")
                if time.monotonic() > deadline:
                    raise BrokerError(f"Kafka did not start in time; log: {self.log_path}")
                chunk = log.read()
                seen = seen[-len(READY_LINE) :] + chunk
                if not chunk:
                    time.sleep(0.05)
        self._check_metadata(deadline)

    def _check_metadata(self, deadline: float) -> None:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        timeout_ms = int(max(deadline - time.monotonic(), 1.0) * 1000)
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers,
                request_timeout_ms=timeout_ms,
                bootstrap_timeout_ms=timeout_ms,
                **self._client_options,
            )
            try:
                admin.list_topics()
            finally:
                admin.close()
        except KafkaError as exc:
            raise BrokerError(
                f"Kafka started but does not answer on {self.bootstrap_servers}: {exc}; "
                f"log: {self.log_path}"
            ) from None

    def _failure(self, jars: KafkaJars, what: str) -> BrokerError:
        """A one-line error: what failed, the log's last meaningful error line, the log file."""
        text = self._log_text()
        detail = last_error(text)
        damaged = _DAMAGED_JARS.search(text)
        if damaged:
            return BrokerError(
                f"{what}: the Kafka jars from {jars.source} look damaged ({damaged.group(0)}): "
                f"{jars.remedy}; log: {self.log_path}"
            )
        return BrokerError(f"{what}: {detail}; log: {self.log_path}")

    def _log_text(self) -> str:
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_start)
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait(self) -> int:
        """Block until the JVM exits; returns its exit code."""
        return 0 if self._process is None else self._process.wait()

    def stop(self, *, timeout_s: float = 30.0) -> None:
        """SIGTERM (a controlled shutdown, about 2 s), SIGKILL after `timeout_s`; then the
        temporary folder goes, unless it was given."""
        atexit.unregister(self.stop)
        self._stop_process(timeout_s)
        self._close_log()
        if self._work_dir is not None and self._given_work_dir is None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
        self._work_dir = None

    def _abort(self) -> None:
        """After a failed start: no JVM, no data; the log stays for the error message."""
        self._stop_process(10.0)
        self._close_log()
        if self._work_dir is not None and self._given_work_dir is None:
            log_inside = self.log_path is not None and self.log_path.parent == self._work_dir
            doomed = self._work_dir / "data" if log_inside else self._work_dir
            shutil.rmtree(doomed, ignore_errors=True)
        self._work_dir = None

    def _stop_process(self, timeout_s: float) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "Kafka (pid %d) ignored SIGTERM for %.0f s: killing it", process.pid, timeout_s
                )
                _kill_group(process.pid)
                process.wait()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _kill_group(pid: int) -> None:
    # The JVM leads its own process group (start_new_session): take anything it started too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
