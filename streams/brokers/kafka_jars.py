"""Java and the Apache Kafka jars for `vaewatch broker --engine kafka`.

The jars come from KAFKA_HOME when it is set (an unpacked Apache Kafka release: its libs/),
otherwise from Maven Central: `mvn dependency:copy-dependencies` on
streams/brokers/kafka_dist/pom.xml (the one place the Kafka version is written) copies them
once into $XDG_CACHE_HOME/vaewatch/kafka-VERSION/libs (~/.cache when XDG_CACHE_HOME is
unset). A marker with every jar's size is written only after a complete copy, so an interrupted
download or a truncated jar is noticed and fetched again rather than handed to the JVM.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from streams.brokers.local import BrokerError

logger = logging.getLogger(__name__)

POM = Path(__file__).with_name("kafka_dist") / "pom.xml"
MIN_JAVA = 17  # Kafka 4.x brokers run on Java 17 or newer
MARKER = "complete.json"
# A cold Maven download of the ~55 MB of jars takes seconds on a good link; the bound is for a
# slow one, so that a stalled resolution still ends in an error rather than a hang.
MVN_TIMEOUT_S = 900.0
_POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MVN_BOILERPLATE = ("To see the full stack trace", "Re-run Maven", "For more information", "[Help")


@functools.cache
def kafka_version() -> str:
    """The Kafka version pinned in streams/brokers/kafka_dist/pom.xml."""
    node = ET.parse(POM).getroot().find("m:properties/m:kafka.version", _POM_NS)
    if node is None or not (node.text or "").strip():
        raise BrokerError(f"{POM} names no kafka.version")
    return (node.text or "").strip()


@dataclass(frozen=True)
class KafkaJars:
    """A folder of Kafka jars, where it came from and what to do when they turn out damaged."""

    libs: Path
    source: str
    remedy: str

    @property
    def classpath(self) -> str:
        return str(self.libs / "*")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vaewatch" / f"kafka-{kafka_version()}"


def find_jars(kafka_home: Path | None = None, *, resolve: bool = True) -> KafkaJars:
    """KAFKA_HOME's jars (the argument, else the environment variable), else the cached ones,
    fetched first when `resolve` and the cache is missing or damaged."""
    home = kafka_home or (Path(os.environ["KAFKA_HOME"]) if os.environ.get("KAFKA_HOME") else None)
    if home is not None:
        libs = home / "libs"
        if not any(libs.glob("kafka_2.13-*.jar")):
            raise BrokerError(
                f"KAFKA_HOME={home} is no Apache Kafka release: no libs/kafka_2.13-*.jar"
            )
        return KafkaJars(libs, f"KAFKA_HOME={home}", f"check or reinstall the release in {home}")
    root = cache_root()
    remedy = f"delete {root} to have the jars fetched again"
    problem = cache_problem(root)
    if problem is not None:
        if not resolve:
            raise BrokerError(f"no usable Kafka jars in {root} ({problem})")
        if problem != "not fetched yet":
            logger.warning("Kafka jar cache %s: %s; fetching it again", root, problem)
        resolve_jars(root)
    return KafkaJars(root / "libs", f"the cache {root}", remedy)


def cache_problem(root: Path) -> str | None:
    """Why the cache under `root` cannot be used, or None when every jar is there whole."""
    try:
        sizes = json.loads((root / MARKER).read_text())
    except FileNotFoundError:
        return "not fetched yet"
    except (OSError, ValueError):
        return f"unreadable {MARKER}"
    if not isinstance(sizes, dict) or not sizes:
        return f"empty {MARKER}"
    for name, size in sizes.items():
        jar = root / "libs" / name
        if not jar.is_file():
            return f"{name} is missing"
        if jar.stat().st_size != size:
            return f"{name} has {jar.stat().st_size} bytes, not {size}"
    return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Two processes starting their first Kafka broker at once (a test run and a CLI) must not
    # both replace libs/ under each other: the second waits and then finds the cache complete.
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_jars(root: Path | None = None) -> Path:
    """Copy the pinned Kafka jars from Maven into `root`/libs (the cache by default)."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if cache_problem(root) is None:
            return root / "libs"
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError(
                f"no Kafka jars: install Maven (mvn) to fetch Kafka {kafka_version()} into "
                f"{root}, or set KAFKA_HOME to an unpacked Apache Kafka release"
            )
        partial = Path(tempfile.mkdtemp(prefix="libs.partial-", dir=root))
        try:
            _run_mvn(mvn, root, partial)
            (root / MARKER).unlink(missing_ok=True)
            shutil.rmtree(root / "libs", ignore_errors=True)
            partial.rename(root / "libs")
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        _write_marker(root)
    logger.info("Kafka %s jars fetched into %s", kafka_version(), root / "libs")
    return root / "libs"


def _run_mvn(mvn: str, root: Path, out: Path) -> None:
    pom = root / "pom.xml"
    shutil.copyfile(POM, pom)
    command = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies"]
    command.append(f"-DoutputDirectory={out}")
    logger.info("fetching the Kafka %s jars with Maven into %s (once)", kafka_version(), root)
    try:
        result = subprocess.run(
            command,
            cwd=root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=MVN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise BrokerError(
            f"Maven did not fetch the Kafka jars within {MVN_TIMEOUT_S:.0f} s (into {root})"
        ) from None
    if result.returncode != 0:
        raise BrokerError(
            f"Maven could not fetch the Kafka {kafka_version()} jars (exit code "
            f"{result.returncode}): {_mvn_error(result.stdout + result.stderr)}"
        )


def _mvn_error(output: str) -> str:
    """Maven's last error line that says what went wrong (not its advice on re-running)."""
    lines = [_ANSI.sub("", line).strip() for line in output.splitlines()]
    errors = [line.removeprefix("[ERROR]").strip() for line in lines if "[ERROR]" in line]
    errors = [e for e in errors if e and not e.startswith(_MVN_BOILERPLATE)]
    last = errors[-1] if errors else next((ln for ln in reversed(lines) if ln), "no output")
    return last[:400]


def _write_marker(root: Path) -> None:
    sizes = {jar.name: jar.stat().st_size for jar in sorted((root / "libs").glob("*.jar"))}
    tmp = root / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(sizes, indent=0))
    os.replace(tmp, root / MARKER)


def find_java(java: str | None = None) -> str:
    """The `java` to run: the argument, else $JAVA_HOME/bin/java, else the one on PATH; checked
    to be Java 17 or newer."""
    if java is None:
        home = os.environ.get("JAVA_HOME")
        in_home = Path(home) / "bin" / "java" if home else None
        java = str(in_home) if in_home and in_home.is_file() else shutil.which("java")
    if java is None:
        raise BrokerError(
            f"no `java` on PATH: the Kafka broker needs Java {MIN_JAVA} or newer "
            "(Debian: apt-get install openjdk-17-jre-headless)"
        )
    try:
        result = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"cannot run {java} -version: {exc}") from None
    output = (result.stderr + result.stdout).strip()
    major = java_major(output)
    if major is None:
        first = output.splitlines()[0] if output else "no output"
        raise BrokerError(f"cannot tell the Java version of {java}: {first}")
    if major < MIN_JAVA:
        raise BrokerError(
            f"{java} is Java {major}: the Kafka broker needs Java {MIN_JAVA} or newer "
            "(Debian: apt-get install openjdk-17-jre-headless)"
        )
    return java


def java_major(version_output: str) -> int | None:
    """17 from `openjdk version "17.0.15"`, 8 from `java version "1.8.0_402"`."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major
