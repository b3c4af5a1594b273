"""The Apache Kafka engine (streams/brokers/apache_kafka.py, kafka_jars.py) with real JVMs: one
broker shared by the module for the client round trips, its own broker where a test stops or
kills one, and failing starts that must end in one line and leave no JVM behind."""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from streams.brokers.apache_kafka import KafkaBroker
from streams.brokers.kafka_files import last_error
from streams.brokers.kafka_jars import (
    cache_problem,
    cache_root,
    find_jars,
    java_major,
    resolve_jars,
)
from streams.brokers.local import BrokerError, create_broker, free_port

REPO = Path(__file__).resolve().parents[3]
JAVA = shutil.which("java")
needs_java = pytest.mark.skipif(
    JAVA is None and not os.environ.get("CI"), reason="no java here (CI must have one)"
)


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie that nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _java_children() -> list[int]:
    """JVMs whose parent is this test process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"java" in cmdline and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _wait_gone(pid: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _one_line(exc: pytest.ExceptionInfo[BrokerError]) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    log = tmp_path_factory.mktemp("kafka") / "server.log"
    with KafkaBroker(log_path=log) as broker:
        yield broker


# -- a running broker --------------------------------------------------------------------------


@pytest.mark.slow
@needs_java
def test_produce_and_consume_round_trip(kafka: KafkaBroker) -> None:
    assert kafka.running and kafka.pid is not None and _alive(kafka.pid)
    assert kafka.bootstrap_servers == f"127.0.0.1:{kafka.port}"
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    for i in range(20):
        producer.send("round-trip", key=b"k", value=f"v{i}".encode())
    producer.flush(timeout=30)
    producer.close()
    consumer = KafkaConsumer(
        "round-trip",
        bootstrap_servers=kafka.bootstrap_servers,
        group_id="round-trip",
        auto_offset_reset="earliest",
        consumer_timeout_ms=20_000,
    )
    values = [record.value for _, record in zip(range(20), consumer, strict=False)]
    consumer.commit()
    consumer.close()
    assert values == [f"v{i}".encode() for i in range(20)]


@pytest.mark.slow
@needs_java
def test_transactions_commit_and_abort(kafka: KafkaBroker) -> None:
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, transactional_id="t-1")
    producer.init_transactions()
    producer.begin_transaction()
    producer.send("transactions", value=b"aborted")
    producer.abort_transaction()
    producer.begin_transaction()
    producer.send("transactions", value=b"committed")
    producer.commit_transaction()
    producer.close()
    consumer = KafkaConsumer(
        "transactions",
        bootstrap_servers=kafka.bootstrap_servers,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        consumer_timeout_ms=5_000,
    )
    values = [record.value for record in consumer]
    consumer.close()
    assert values == [b"committed"]


@pytest.mark.slow
@needs_java
def test_stop_ends_the_jvm_and_removes_its_folder() -> None:
    broker = create_broker("kafka")
    broker.start()
    assert isinstance(broker, KafkaBroker) and broker.work_dir is not None
    pid, work_dir = broker.pid, broker.work_dir
    assert pid is not None and _alive(pid) and (work_dir / "data" / "meta.properties").is_file()
    broker.stop()
    assert not _alive(pid)
    assert not work_dir.exists()
    assert not broker.running and broker.pid is None


@pytest.mark.slow
@needs_java
def test_a_given_work_dir_keeps_its_data_across_restarts(tmp_path: Path) -> None:
    broker = KafkaBroker(work_dir=tmp_path / "kafka")
    with broker:
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        producer.send("kept", value=b"still here").get(timeout=30)
        producer.close()
    assert (tmp_path / "kafka" / "data" / "meta.properties").is_file()
    with broker:  # same ports, same log dir: formatting it again is skipped
        consumer = KafkaConsumer(
            "kept",
            bootstrap_servers=broker.bootstrap_servers,
            auto_offset_reset="earliest",
            consumer_timeout_ms=10_000,
        )
        values = [record.value for _, record in zip(range(1), consumer, strict=False)]
        consumer.close()
    assert values == [b"still here"]


@pytest.mark.slow
@needs_java
def test_the_jvm_follows_a_killed_parent(tmp_path: Path) -> None:
    """SIGKILL to Python (no stop(), no atexit): the JVM gets SIGTERM from the kernel."""
    script = (
        "import time\nfrom streams.brokers.apache_kafka import KafkaBroker\n"
        "b = KafkaBroker().start()\nprint(b.pid, b.work_dir, flush=True)\ntime.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        line = _read_until(parent, lambda text: text.endswith("\n"), timeout_s=120)
    finally:
        parent.kill()
        parent.wait()
    pid, work_dir = line.split()
    try:
        assert _wait_gone(int(pid)), f"JVM {pid} outlived its parent"
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


# -- failures: one line each, no JVM left --------------------------------------------------------


def test_a_taken_port_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerError) as exc:
            KafkaBroker(port=port).start()
    assert f"127.0.0.1:{port} is already in use" in _one_line(exc)


def test_no_java_on_path_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(BrokerError) as exc:
        KafkaBroker().start()
    assert "no `java` on PATH" in _one_line(exc)


def test_an_old_java_is_refused(tmp_path: Path) -> None:
    old = tmp_path / "java"
    old.write_text("#!/bin/sh\necho 'openjdk version \"11.0.22\" 2024-01-16' >&2\n")
    old.chmod(0o755)
    with pytest.raises(BrokerError) as exc:
        KafkaBroker(java=str(old)).start()
    assert "is Java 11" in _one_line(exc) and "17 or newer" in str(exc.value)


def test_java_versions_are_read() -> None:
    assert java_major('openjdk version "17.0.15" 2025-04-15') == 17
    assert java_major('openjdk version "21" 2023-09-19') == 21
    assert java_major('java version "1.8.0_402"') == 8
    assert java_major("garbage") is None


@needs_java
def test_no_maven_and_no_cache_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # neither mvn nor java
    monkeypatch.delenv("KAFKA_HOME", raising=False)
    with pytest.raises(BrokerError) as exc:
        KafkaBroker(java=JAVA).start()
    message = _one_line(exc)
    assert "install Maven" in message and "KAFKA_HOME" in message
    assert str(tmp_path / "cache") in message


@pytest.mark.skipif(shutil.which("mvn") is None, reason="no mvn here")
def test_a_failed_maven_run_names_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Real Maven, offline with an empty local repository: it fails as without a network.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = cache_root()
    (root / ".mvn").mkdir(parents=True)
    (root / ".mvn" / "maven.config").write_text(f"-o\n-Dmaven.repo.local={tmp_path / 'm2'}\n")
    with pytest.raises(BrokerError) as exc:
        resolve_jars()
    message = _one_line(exc)
    assert "Maven could not fetch" in message and "Re-run Maven" not in message
    assert "offline" in message or "No plugin found" in message
    assert cache_problem(root) == "not fetched yet"  # nothing half-copied is taken as complete
    assert not list(root.glob("libs*"))


def test_jars_without_their_marker_are_not_a_cache(tmp_path: Path) -> None:
    (tmp_path / "libs").mkdir()
    (tmp_path / "libs" / "kafka_2.13-x.jar").write_bytes(b"PK")
    assert cache_problem(tmp_path) == "not fetched yet"
    (tmp_path / "complete.json").write_text('{"kafka_2.13-x.jar": 3}')
    assert cache_problem(tmp_path) == "kafka_2.13-x.jar has 2 bytes, not 3"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mvn") is None, reason="no mvn here")
def test_a_truncated_jar_in_the_cache_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = find_jars(resolve=True).libs
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("KAFKA_HOME", raising=False)
    root = cache_root()
    shutil.copytree(real.parent, root, symlinks=False, ignore=shutil.ignore_patterns("libs"))
    (root / "libs").mkdir()
    for jar in real.iterdir():  # links: the real cache is neither copied nor touched
        (root / "libs" / jar.name).symlink_to(jar)
    victim = root / "libs" / next(p.name for p in real.glob("kafka_2.13-*.jar"))
    victim.unlink()
    victim.write_bytes((real / victim.name).read_bytes()[:1000])
    assert "has 1000 bytes" in (cache_problem(root) or "")
    assert find_jars().libs == root / "libs"
    assert cache_problem(root) is None
    assert victim.stat().st_size == (real / victim.name).stat().st_size


@pytest.mark.slow
@needs_java
def test_a_damaged_jar_names_where_the_jars_came_from(tmp_path: Path) -> None:
    home = tmp_path / "kafka"
    (home / "libs").mkdir(parents=True)
    for jar in find_jars().libs.iterdir():
        (home / "libs" / jar.name).symlink_to(jar)
    victim = next((home / "libs").glob("kafka-group-coordinator-[0-9]*.jar"))
    data = victim.read_bytes()
    victim.unlink()
    victim.write_bytes(data[: len(data) // 3])
    log = tmp_path / "server.log"
    jvms = set(_java_children())  # the module's broker, when it runs
    with pytest.raises(BrokerError) as exc:
        KafkaBroker(kafka_home=home, log_path=log).start()
    message = _one_line(exc)
    assert f"KAFKA_HOME={home}" in message and "look damaged" in message
    assert f"log: {log}" in message and log.is_file()
    assert set(_java_children()) <= jvms


@pytest.mark.slow
@needs_java
def test_a_jvm_that_exits_on_start_up_names_the_error_and_the_log(tmp_path: Path) -> None:
    jvms = set(_java_children())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        controller_port = taken.getsockname()[1]
        log = tmp_path / "server.log"
        with pytest.raises(BrokerError) as exc:
            KafkaBroker(controller_port=controller_port, log_path=log).start()
    message = _one_line(exc)
    assert "the Kafka JVM exited with code" in message
    assert f"127.0.0.1:{controller_port}: Address already in use" in message
    assert message.endswith(f"log: {log}")
    assert set(_java_children()) <= jvms


def test_last_error_prefers_the_cause_with_context() -> None:
    log = (
        "[2026-01-01 00:00:00,000] INFO starting (kafka.Kafka)\n"
        "[2026-01-01 00:00:01,000] ERROR Encountered fatal fault: caught exception (x.Handler)\n"
        "java.lang.RuntimeException: Unable to start acceptor for CONTROLLER\n"
        "\tat kafka.network.SocketServer.x(SocketServer.scala:1)\n"
        "Caused by: org.apache.kafka.common.KafkaException: Socket server failed to bind to "
        "127.0.0.1:1: Address already in use.\n"
        "Caused by: java.net.BindException: Address already in use\n"
        "[2026-01-01 00:00:02,000] INFO shutting down (kafka.Kafka)\n"
    )
    assert last_error(log) == (
        "ERROR Encountered fatal fault: caught exception (x.Handler); cause: KafkaException: "
        "Socket server failed to bind to 127.0.0.1:1: Address already in use."
    )
    assert last_error("") == "the log is empty"


# -- the command -------------------------------------------------------------------------------


def _read_until(
    process: subprocess.Popen[str], done: Callable[[str], bool], *, timeout_s: float
) -> str:
    """Text the process printed on stdout until `done(text)` holds (or it exits, or time's up)."""
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    text = ""
    deadline = time.monotonic() + timeout_s
    while not done(text):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not selector.select(remaining):
            raise AssertionError(f"timed out; output so far: {text!r}")
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"exited with {process.wait()}; output: {text!r}")
        text += line
    return text


@pytest.mark.slow
@needs_java
def test_vaewatch_broker_engine_kafka(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "vaewatch.cli", "broker", "--engine", "kafka"]
    process = subprocess.Popen(
        [*command, "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        output = _read_until(process, lambda text: "Ctrl-C stops it" in text, timeout_s=180)
        assert "Apache Kafka 4." in output and f"on 127.0.0.1:{port};" in output
        jvm = int(re.search(r"\(pid (\d+)\)", output).group(1))  # type: ignore[union-attr]
        producer = KafkaProducer(bootstrap_servers=f"127.0.0.1:{port}")
        producer.send("images", value=b"hello").get(timeout=30)
        producer.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert _wait_gone(jvm, timeout_s=5)
