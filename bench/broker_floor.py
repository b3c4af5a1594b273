"""Broker floors: what each broker does with no worker, Tansu and Kafka side by side in one run.

    .venv/bin/python bench/broker_floor.py [--records 200000] [--engine both|tansu|kafka]

For each engine, on a fresh broker (bench/brokers.py), one topic of one partition:

1. Kafka's producer perf tool (org.apache.kafka.tools.ProducerPerformance, from the jars cached
   for the Kafka broker, streams/brokers/kafka_jars.py) writes N records of 784 bytes (the size
   of one raw Fashion-MNIST image), acks=all, no throttle: the rate it reports.
2. Kafka's consumer perf tool (ConsumerPerformance) reads the N records in a consumer group: its
   fetch rate, which leaves out the group join.
3. kafka-python, the client the worker uses: a bare KafkaConsumer assigned the partition (no
   group, no commits), 10,000 records a poll, CRC-32C checked with the crc32c C extension when
   installed: N records over the time from its first poll to the last record.

The broker's CPU seconds over each step come from /proc/<pid>/stat (the Tansu process, or
Kafka's JVM: all its threads); for the Java tools they include the tool's JVM start-up, when
the broker is idle. MB/s is of the record values (10^6 bytes). A step that fails (a Java client
against Tansu, say) is a row saying why, not the end of the run; when the Java producer fails,
kafka-python fills the topic, so that the consumers are still measured.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from brokers import add_engine_options, broker_cpu_s, note, run_order, started_broker
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.record import util as record_util

from streams.brokers.kafka_files import last_error, log4j_properties
from streams.brokers.kafka_jars import KafkaJars, find_jars, find_java
from streams.brokers.local import Broker, BrokerError
from streams.config import StreamConfig
from streams.kafka_io import ensure_topics

TOPIC = "floor.records"
RECORD_SIZE = 784
TOOLS = "org.apache.kafka.tools"
JVM_OPTIONS = ("-Xmx512m", "-Djava.awt.headless=true")  # the heap kafka-*-perf-test.sh give
# "Cancelled in-flight API_VERSIONS request with correlation id 3 due to node 111 being
# disconnected": the client's log line for a request the broker answered by closing the socket.
CANCELLED = re.compile(r"Cancelled in-flight (\w+) request")
DROPPED_LIMIT = 10


class StepError(Exception):
    """A step could not be measured; the message says why, in one line."""


@dataclass
class Row:
    engine: str
    tool: str
    records_per_s: float | None = None
    broker_cpu_s: float | None = None
    note: str = ""


class JavaTools:
    """Runs Kafka's command-line tools from the cached jars; each run's log4j log in a file."""

    def __init__(self, java: str, jars: KafkaJars, folder: Path):
        self.java, self.jars, self.folder = java, jars, folder
        self.runs = 0

    def run(self, main: str, *args: str, timeout_s: float) -> str:
        """The tool's standard output. StepError when it fails, runs out of time, or the broker
        keeps closing its connections (the client would retry until the timeout)."""
        self.runs += 1
        log = self.folder / f"{self.runs}.{main}.log"
        config = self.folder / f"{self.runs}.log4j2.properties"
        config.write_text(log4j_properties(log))
        command = [self.java, *JVM_OPTIONS, f"-Dlog4j2.configurationFile={config}"]
        command += ["-cp", self.jars.classpath, f"{TOOLS}.{main}", *args]
        out, err = self.folder / f"{self.runs}.out", self.folder / f"{self.runs}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
            )
            try:
                self._watch(process, main, log, time.monotonic() + timeout_s)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        if process.returncode != 0:
            why = _first_exception(err.read_text(errors="replace")) or last_error(_read(log))
            raise StepError(f"{main} exited with code {process.returncode}: {why[:300]}")
        return out.read_text(errors="replace")

    @staticmethod
    def _watch(process: subprocess.Popen[bytes], main: str, log: Path, deadline: float) -> None:
        while process.poll() is None:
            cancelled = CANCELLED.findall(_read(log))
            if len(cancelled) >= DROPPED_LIMIT:
                requests = "/".join(sorted(set(cancelled)))
                raise StepError(
                    f"the broker closed {main}'s connections {len(cancelled)} times, each with "
                    f"its {requests} request unanswered (the Java client would retry for ever)"
                )
            if time.monotonic() > deadline:
                raise StepError(f"{main} did not finish in time")
            time.sleep(0.2)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _first_exception(text: str) -> str:
    lines = [line.strip() for line in text.splitlines()]
    return next((line for line in lines if "Exception" in line or "Error" in line), "")


def java_produce(tools: JavaTools, bootstrap: str, n: int) -> float:
    output = tools.run(
        "ProducerPerformance",
        "--bootstrap-server",
        bootstrap,
        "--topic",
        TOPIC,
        "--num-records",
        str(n),
        "--record-size",
        str(RECORD_SIZE),
        "--throughput",
        "-1",
        "--command-property",
        "acks=all",
        timeout_s=60 + n / 1000,
    )
    # the last line: "N records sent, R records/sec (M MB/sec), ... ms avg latency, ..."
    totals = re.findall(r"^(\d+) records sent, ([\d.]+) records/sec", output, re.MULTILINE)
    if not totals:
        raise StepError(f"ProducerPerformance printed no total: {_last_line(output)}")
    sent, rate = totals[-1]
    if int(sent) != n:
        raise StepError(f"ProducerPerformance sent {sent} of {n} records")
    return float(rate)


def java_consume(tools: JavaTools, bootstrap: str, n: int) -> float:
    output = tools.run(
        "ConsumerPerformance",
        "--bootstrap-server",
        bootstrap,
        "--topic",
        TOPIC,
        "--num-records",
        str(n),
        "--timeout",
        "30000",
        timeout_s=90 + n / 1000,
    )
    # a header "start.time, end.time, ..., data.consumed.in.nMsg, ..., fetch.nMsg.sec" and a row
    lines = [line for line in output.splitlines() if line.strip()]
    header = next((i for i, line in enumerate(lines) if "fetch.nMsg.sec" in line), None)
    if header is None or header + 1 >= len(lines):
        raise StepError(f"ConsumerPerformance printed no statistics: {_last_line(output)}")
    names = [name.strip() for name in lines[header].split(",")]
    values = dict(
        zip(names, (value.strip() for value in lines[header + 1].split(",")), strict=False)
    )
    consumed = int(float(values["data.consumed.in.nMsg"]))
    if consumed < n:
        raise StepError(f"ConsumerPerformance consumed {consumed} of {n} records")
    return float(values["fetch.nMsg.sec"])


def python_consume(bootstrap: str, n: int) -> float:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=10_000,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    try:
        consumer.assign([TopicPartition(TOPIC, 0)])
        total, started = 0, time.perf_counter()
        deadline = started + 60 + n / 1000
        while total < n:
            if time.perf_counter() > deadline:
                raise StepError(f"kafka-python read {total} of {n} records in time")
            for records in consumer.poll(timeout_ms=1000).values():
                total += len(records)
        return total / (time.perf_counter() - started)
    finally:
        consumer.close()


def python_fill(bootstrap: str, n: int) -> None:
    """The topic's N records written by kafka-python, for when the Java producer failed."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, batch_size=1 << 20
    )
    value = bytes(RECORD_SIZE)
    for _ in range(n):
        producer.send(TOPIC, value=value, partition=0)
    producer.flush()
    producer.close()


def measured(broker: Broker, row: Row, step, *args) -> bool:
    """Run a step into `row`: its rate and the broker's CPU over it; False when it failed."""
    before = broker_cpu_s(broker)
    try:
        row.records_per_s = step(*args)
    except (StepError, KafkaError) as exc:
        row.note = f"failed: {exc}"
        return False
    finally:
        row.broker_cpu_s = broker_cpu_s(broker) - before
    return True


def engine_floor(engine: str, n: int, tools: JavaTools | None, tools_problem: str) -> list[Row]:
    producer_row = Row(engine, "ProducerPerformance (Java)")
    consumer_row = Row(engine, "ConsumerPerformance (Java)")
    python_row = Row(engine, "kafka-python KafkaConsumer")
    with started_broker(engine) as broker:
        bootstrap = broker.bootstrap_servers
        ensure_topics(config=StreamConfig(bootstrap_servers=bootstrap), topics=[TOPIC])
        if tools is None:
            producer_row.note = consumer_row.note = f"not run: {tools_problem}"
            produced = False
        else:
            note(f"{engine}: ProducerPerformance, {n:,} records")
            produced = measured(broker, producer_row, java_produce, tools, bootstrap, n)
        if not produced:
            note(f"{engine}: filling the topic with kafka-python instead")
            python_fill(bootstrap, n)
            python_row.note = "topic filled by kafka-python"
        if tools is not None:
            note(f"{engine}: ConsumerPerformance")
            measured(broker, consumer_row, java_consume, tools, bootstrap, n)
        note(f"{engine}: kafka-python consume")
        measured(broker, python_row, python_consume, bootstrap, n)
    return [producer_row, consumer_row, python_row]


def table(rows: list[Row], n: int) -> str:
    lines = [
        "| engine | tool | records/s | MB/s | broker CPU s | broker CPU us/record | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        rate = row.records_per_s
        cells = [row.engine, row.tool]
        cells.append(f"{rate:,.0f}" if rate else "")
        cells.append(f"{rate * RECORD_SIZE / 1e6:,.1f}" if rate else "")
        cpu = row.broker_cpu_s if rate else None  # not of a failed step
        cells.append(f"{cpu:.2f}" if cpu is not None else "")
        cells.append(f"{cpu / n * 1e6:.1f}" if cpu is not None else "")
        cells.append(row.note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000)
    add_engine_options(parser, repeats=False, default="both", fetch_wait=False)
    args = parser.parse_args()
    crc = "C extension" if record_util.crc32c_c is not None else "pure Python (pip install crc32c)"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tools: JavaTools | None = JavaTools(find_java(), find_jars(), Path(tmp))
            tools_problem = ""
        except BrokerError as exc:
            tools, tools_problem = None, str(exc)
        rows = [
            row
            for engine in run_order(args.engine)
            for row in engine_floor(engine, args.records, tools, tools_problem)
        ]
    print(
        f"\nBroker floors, {args.records:,} records of {RECORD_SIZE} bytes, one partition, "
        f"no worker; kafka-python's CRC-32C: {crc}.\n"
    )
    print(table(rows, args.records))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
