"""What a user sees when the secured broker refuses a vaewatch client: a wrong password, a CA
that did not sign the broker's certificate, an expired certificate (the broker's, the
client's), a certificate for another host, a missing ACL. Each gives one line naming its cause
within a bounded time (the bootstrap timeout, 2 s here), the worker stays up and unready while
it lasts, and the password shows nowhere: not in logs, metrics or errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest
from kafka.errors import TopicAuthorizationFailedError

from streams import client_internals
from streams.acls import client_acls
from streams.config import StreamConfig
from streams.connection_errors import BrokerConnectionError
from streams.kafka_io import create_consumer, create_producer, ensure_topics
from tests.fixtures_broker import WorkerProcess, metric_value, start_worker
from tests.fixtures_secured_kafka import (
    WORKER,
    WORKER_PASSWORD,
    SecuredKafka,
    first_alert_card,
    stream_env,
    use_stream_env,
)
from tests.streams.kafka_helpers import (
    produce_values,
    raw_images,
    read_json,
    read_topic,
    wait_committed,
)

pytestmark = pytest.mark.slow

PRINCIPAL = f"User:{WORKER}"
BOOTSTRAP_TIMEOUT_MS = 2000
WRONG_PASSWORD = "not the password #1"


@dataclass(frozen=True)
class Failure:
    listener: str  # the secured broker's listener the client reaches
    settings: dict[str, Any]  # stream settings (the worker principal's, these replaced)
    cause: str  # a regular expression the one-line error matches


def _failures(folder) -> dict[str, Failure]:
    return {
        "wrong password": Failure(
            "sasl",
            {"sasl_password": WRONG_PASSWORD},
            r"SASL authentication of user 'worker' \(SCRAM-SHA-512\) failed",
        ),
        "unknown CA": Failure(
            "sasl",
            {"ssl_cafile": str(folder / "other-ca.crt")},
            r"the broker's TLS certificate is not signed by a CA in \S*other-ca\.crt",
        ),
        "expired server certificate": Failure(
            "expired", {}, r"the broker's TLS certificate has expired"
        ),
        "expired client certificate": Failure(
            "mtls",
            {
                "ssl_certfile": str(folder / "worker-expired.crt"),
                "ssl_keyfile": str(folder / "worker-expired.key"),
            },
            r"the broker refused the client certificate \S*worker-expired\.crt .*it expired on",
        ),
        "wrong host name": Failure(
            "wronghost", {}, r"the broker's TLS certificate is not valid for the host name"
        ),
    }


CASES = [
    "wrong password",
    "unknown CA",
    "expired server certificate",
    "expired client certificate",
    "wrong host name",
]


def _config(secured: SecuredKafka, failure: Failure, **more: Any):
    base = "sasl" if failure.listener == "sasl" else "mtls"
    settings = {
        "bootstrap_servers": secured.address(failure.listener),
        "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS,
        **failure.settings,
        **more,
    }
    return secured.config(base, **settings)


@pytest.mark.parametrize("case", CASES)
def test_a_client_that_cannot_connect_names_the_cause_in_one_line(secured_kafka, case) -> None:
    failure = _failures(secured_kafka.folder)[case]
    config = _config(secured_kafka, failure)
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError) as raised:
        create_consumer(config=config, grouped=False)
    took = time.monotonic() - started
    message = str(raised.value)
    assert re.search(failure.cause, message), message
    assert message.startswith(f"cannot connect to Kafka at {config.bootstrap_servers} (")
    assert "\n" not in message and WRONG_PASSWORD not in message
    assert took < BOOTSTRAP_TIMEOUT_MS / 1000 + 3, took  # the bootstrap timeout, and no more


def test_the_producer_and_the_admin_client_name_it_too(secured_kafka) -> None:
    failure = _failures(secured_kafka.folder)["wrong password"]
    config = _config(secured_kafka, failure)
    for connect in (
        lambda: create_producer(config=config),
        lambda: ensure_topics(config=config, topics=["x"]),
    ):
        with pytest.raises(BrokerConnectionError, match=failure.cause):
            connect()


def _readyz(worker: WorkerProcess) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{worker.url}/readyz", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait_until_model_loaded(worker: WorkerProcess, *, timeout_s: float = 60.0):
    """/readyz's (status, body) once it says the model is loaded."""
    deadline = time.monotonic() + timeout_s
    status, body = _readyz(worker)
    while not body["checks"]["model_loaded"]:
        assert time.monotonic() < deadline, f"model not loaded after {timeout_s} s: {body}"
        time.sleep(0.1)
        status, body = _readyz(worker)
    return status, body


def _wait_for_line(worker: WorkerProcess, pattern: str, *, timeout_s: float = 60.0) -> str:
    """The first line of the worker's log that matches `pattern` (waits for it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in worker.log().splitlines():
            if re.search(pattern, line):
                return line
        if worker.process.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no line matching {pattern!r}; log:\n{worker.log()}")


def _start(topics, tmp_path, monkeypatch, config, *, model) -> WorkerProcess:
    """`vaewatch worker` with `config`'s address and security settings (from the environment)
    on the test's topics, not waiting for it to get ready."""
    use_stream_env(monkeypatch, config)
    return start_worker(
        model=model,
        topics=topics,
        log_dir=tmp_path,
        wait=False,
        extra_args=[
            "--set",
            f"stream.bootstrap_servers={config.bootstrap_servers}",
            "--set",
            f"stream.bootstrap_timeout_ms={config.bootstrap_timeout_ms}",
            "--set",
            f"stream.processing_guarantee={config.processing_guarantee}",
        ],
    )


@pytest.mark.parametrize("case", CASES)
def test_a_worker_that_cannot_connect_says_why_and_stays_unready(
    secured_kafka, trained_bundle, tmp_path, monkeypatch, case
) -> None:
    failure = _failures(secured_kafka.folder)[case]
    topics = secured_kafka.topics()
    config = _config(secured_kafka, failure)
    started = time.monotonic()
    worker = _start(topics, tmp_path, monkeypatch, config, model=trained_bundle)
    try:
        line = _wait_for_line(worker, r"cannot connect to Kafka")
        took = time.monotonic() - started
        assert re.search(failure.cause, line), line
        # Unready for that reason alone: once the model is loaded (and so before it is
        # stopped: a worker stopped while its scoring process still starts is another story).
        status, body = _wait_until_model_loaded(worker)
        assert status == 503 and body["checks"]["broker_connected"] is False, body
        metrics = worker.metrics_text()
        assert 'vaewatch_errors_total{kind="broker"}' in metrics
        assert worker.metric("vaewatch_ready") == 0
        assert WRONG_PASSWORD not in metrics + json.dumps(body)
        print(f"{case}: reported {took:.1f} s after the worker started")
    finally:
        code = worker.stop()
    log = worker.log()
    assert code == 0, log  # stopped before any broker answered: nothing consumed
    assert WRONG_PASSWORD not in log and WORKER_PASSWORD not in log
    assert "Traceback" not in log, log


def _worker_config(secured: SecuredKafka, topics, **overrides):
    names = ("input_topic", "alert_topic", "scores_topic", "dlq_topic", "group_id")
    return secured.config("sasl", **{n: getattr(topics.config, n) for n in names}, **overrides)


@pytest.mark.parametrize(
    ("missing", "cause"),
    [
        (
            ("topic", "read"),
            r"input topic: not authorized for topic \S+\.images .*grant User:worker READ",
        ),
        (("group", "read"), r"not authorized for consumer group '\S+\.group'"),
    ],
    ids=["input topic READ", "group READ"],
)
def test_a_missing_acl_keeps_the_worker_unready_until_it_is_granted(
    secured_kafka, trained_bundle, tmp_path, monkeypatch, missing, cause
) -> None:
    """The worker names the ACL it lacks, is not ready while it lacks it, and scores its input
    once the ACL is granted (without a restart)."""
    topics = secured_kafka.topics()
    config = _worker_config(secured_kafka, topics, bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
    acls = client_acls("worker", config, principal=PRINCIPAL)
    withheld = [a for a in acls if (a.resource_type, a.operation) == missing]
    secured_kafka.grant(a for a in acls if a not in withheld)
    produce_values(topics.config, raw_images(50))
    worker = _start(topics, tmp_path, monkeypatch, config, model=trained_bundle)
    try:
        started = time.monotonic()
        line = _wait_for_line(worker, cause)
        print(f"{missing}: named {time.monotonic() - started:.1f} s after the worker started")
        status, body = _readyz(worker)
        assert status == 503 and body["checks"]["authorized"] is False, body
        assert len([ln for ln in worker.log().splitlines() if "not authorized" in ln]) <= 2
        secured_kafka.grant(withheld)
        worker.wait_ready(timeout_s=60)
        scores = read_topic(topics.config, topics.config.scores_topic, until=50)
        assert sorted({s["offset"] for s in read_json(scores)}) == list(range(50))
        assert "authorized again" in worker.log() or missing[0] == "group"
    finally:
        assert worker.stop() == 0, worker.log()
    assert line.count("\n") == 0


def test_exactly_once_without_its_transactional_id_acl_stops_with_one_line(
    secured_kafka, trained_bundle, tmp_path, monkeypatch
) -> None:
    topics = secured_kafka.topics()
    config = _worker_config(secured_kafka, topics, processing_guarantee="exactly_once")
    acls = client_acls("worker", config, principal=PRINCIPAL)
    secured_kafka.grant(a for a in acls if a.resource_type != "transactional_id")
    worker = _start(topics, tmp_path, monkeypatch, config, model=trained_bundle)
    assert worker.wait(timeout_s=60) == 2
    last = worker.log().strip().splitlines()[-1]
    assert re.match(
        r"vaewatch: error: .*not authorized for transactional id '\S+\.group-\S+' .*grant WRITE",
        last,
    ), worker.log()


def _vaewatch(config, *args: str) -> subprocess.CompletedProcess:
    """`vaewatch ARGS` with `config`'s address and security settings from the environment."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "vaewatch.cli",
            "--set",
            f"stream.bootstrap_timeout_ms={BOOTSTRAP_TIMEOUT_MS}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **stream_env(config)},
    )


def test_vaewatch_produce_with_a_wrong_password_prints_one_line(secured_kafka) -> None:
    failure = _failures(secured_kafka.folder)["wrong password"]
    config = _config(secured_kafka, failure)
    done = _vaewatch(config, "produce", "--count", "10")
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("vaewatch: error: cannot connect to Kafka") and re.search(
        failure.cause, last
    ), done.stderr
    assert "Traceback" not in done.stderr
    assert WRONG_PASSWORD not in done.stdout + done.stderr


def test_vaewatch_produce_to_a_topic_without_write_names_it(secured_kafka) -> None:
    """Sends the broker refuses are an error naming the topic, not 'sent 10 records'. Kafka
    refuses the idempotent producer's id to a principal with WRITE on no topic at all, and the
    topic to one with WRITE elsewhere (other tests of this module grant some): both name the
    ACL to grant."""
    topics = secured_kafka.topics()
    config = _worker_config(secured_kafka, topics)
    # It may read the topic (and so see it), but not write it.
    secured_kafka.grant(client_acls("recalibrate", config, principal=PRINCIPAL))
    done = _vaewatch(config, "produce", "--count", "10", "--topic", config.input_topic)
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(
        rf"vaewatch: error: {re.escape(config.input_topic)}: 10 records were not sent: not "
        rf"authorized (to produce|for topic {re.escape(config.input_topic)}) .*grant "
        r"User:worker WRITE on",
        last,
    ), done.stderr
    assert "Traceback" not in done.stderr


def test_the_console_says_which_topic_it_may_not_read(secured_kafka, trained_bundle) -> None:
    """Live alerts with READ on the alert topic but not on the input topic: the card says the
    image cannot be read back and why, at once (not after the read-back timeout)."""
    topics = secured_kafka.topics()
    config = _worker_config(secured_kafka, topics)
    secured_kafka.grant(
        a for a in client_acls("serve", config, principal=PRINCIPAL) if a.name == config.alert_topic
    )
    produce_values(topics.config, raw_images(1))
    card = first_alert_card(trained_bundle, config=config, producer_config=topics.config)
    assert re.match(
        rf"cannot read it back: not authorized for topic {re.escape(config.input_topic)} ",
        card["image_error"],
    ), card["image_error"]


def _headers(record) -> dict[str, str]:
    return {k: v.decode("utf-8", "replace") for k, v in (record.headers or [])}


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_missing_write_acl_on_one_output_topic_never_halts_the_partition(
    secured_kafka, trained_bundle, tmp_path, monkeypatch, guarantee
) -> None:
    """The worker may write its scores and dead letters but not its alerts: every record is
    scored and committed, each refused alert becomes a dead letter naming the alert topic and
    the broker's reason, one line in the log says so, and nothing is lost (issue 27). The
    worker stays in its group: kafka-python's send() to a topic it may not describe waits for a
    metadata answer each time, and 200 alerts sent that way stalled the loop past
    max_poll_interval_ms. Such a send never joins a transaction: exactly-once aborts none."""
    n = 200
    topics = secured_kafka.topics()
    config = _worker_config(secured_kafka, topics, processing_guarantee=guarantee)
    secured_kafka.grant(
        a
        for a in client_acls("worker", config, principal=PRINCIPAL)
        if not (a.name == config.alert_topic and a.operation == "write")
    )
    produce_values(topics.config, raw_images(n))  # noise: every record is an anomaly
    use_stream_env(monkeypatch, config)
    worker = start_worker(
        model=trained_bundle,
        topics=topics,
        log_dir=tmp_path,
        extra_args=["--set", f"stream.processing_guarantee={guarantee}"],
        timeout_s=60,
    )
    try:
        scores = read_json(
            read_topic(
                topics.config,
                config.scores_topic,
                until=n,
                isolation_level="read_committed",
            )
        )
        anomalies = {s["offset"] for s in scores if s["anomaly"]}
        letters = read_topic(
            topics.config,
            config.dlq_topic,
            until=len(anomalies),
            isolation_level="read_committed",
        )
        assert wait_committed(topics.config, n) == n, worker.log()
        text = worker.metrics_text()
    finally:
        assert worker.stop() == 0, worker.log()
    assert sorted({s["offset"] for s in scores}) == list(range(n))
    assert anomalies, "random noise should be anomalous"
    refused = [int(_headers(r)["vaewatch.source.offset"]) for r in letters]
    assert set(refused) == anomalies
    alerts = 'vaewatch_outputs_refused_total{output="alert",reason="not_authorized"}'
    assert metric_value(text, alerts) == len(anomalies)
    assert "evicted from the group" not in worker.log(), worker.log()
    if guarantee == "exactly_once":
        assert len(refused) == len(anomalies) and len(scores) == n
        aborted = metric_value(text, 'vaewatch_transactions_total{outcome="aborted"}')
        assert aborted == 0, worker.log()
    details = {_headers(r).get("vaewatch.error.detail", "") for r in letters}
    assert all(config.alert_topic in d and "TopicAuthorizationFailed" in d for d in details)
    assert any(
        config.alert_topic in line and "TopicAuthorizationFailed" in line
        for line in worker.log().splitlines()
    ), worker.log()


def test_kafka_python_fails_a_send_to_a_topic_it_may_not_describe_outside_the_transaction(
    secured_kafka,
) -> None:
    """The pin of client_internals.failed_before_sending: kafka-python 3.0.12's send() to a
    topic whose metadata the ACLs refuse returns a future failed already, with its produce
    result never answered, and the open transaction stays usable: a send to a topic the worker
    may write commits with it. When this test fails, a release changed that, and exactly-once
    must abort such a transaction again (streams/worker/batch.py, _outside_the_transaction)."""
    topics = secured_kafka.topics()
    config = _worker_config(secured_kafka, topics, processing_guarantee="exactly_once")
    secured_kafka.grant(
        a
        for a in client_acls("worker", config, principal=PRINCIPAL)
        if not (a.name == config.alert_topic and a.operation == "write")
    )
    producer = create_producer(config=config, transactional_id=f"{config.group_id}-pin")
    try:
        producer.init_transactions()
        producer.begin_transaction()
        denied = producer.send(config.alert_topic, b"an alert")
        assert denied.is_done and isinstance(denied.exception, TopicAuthorizationFailedError)
        assert client_internals.failed_before_sending(denied)
        allowed = producer.send(config.scores_topic, b"a score")
        producer.commit_transaction()
        assert allowed.get(timeout=10) is not None
        assert not client_internals.failed_before_sending(allowed)
    finally:
        producer.close(timeout=5)
    committed = read_topic(
        topics.config, config.scores_topic, until=1, isolation_level="read_committed"
    )
    assert [r.value for r in committed] == [b"a score"]


def test_tls_to_a_plaintext_listener_says_so(kafka_broker) -> None:
    config = StreamConfig(
        bootstrap_servers=kafka_broker.bootstrap_servers,
        security_protocol="SSL",
        bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS,
    )
    with pytest.raises(BrokerConnectionError, match=r"the listener does not speak TLS"):
        create_consumer(config=config, grouped=False)
