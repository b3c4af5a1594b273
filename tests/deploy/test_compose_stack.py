"""deploy/compose.yaml for real (`make deploy-test`): the stack runs in podman from the images
`make image` and deploy/local-images/build.sh built, and is checked end to end.

Apache Kafka (KRaft) and Prometheus run from images made of Debian's packages and the project's
Kafka jars (KAFKA_IMAGE, PROMETHEUS_IMAGE: the official images cannot be pulled here); the
topics, trainer, worker, serve and producer services run the vaewatch image. The only changes to
the file's services: published host ports moved to free ones (its variables), and the trainer
trains one epoch (VAEWATCH_TRAIN__EPOCHS) instead of fifteen. Grafana is not run (no image
here); its dashboard's queries run against a live Prometheus in test_live.py.

Checked: alerts arrive on the alert topic, Prometheus holds the worker's series and evaluates
every rule of deploy/prometheus/rules.yml without error, the anomaly-rate alert goes pending on
the 20%-anomalies stream, serve answers /readyz, and SIGTERM to the worker's container drains it
(the consumer group is left at once, not after a session timeout) and exits 0.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from streams.brokers.local import free_port
from tests.deploy.compose_stack import ComposeStack
from tests.deploy.containers import Podman, run_scope, stack_images, wait_for
from tests.deploy.deploy_files import RULES, load_yaml
from tests.deploy.prometheus_api import Prometheus

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1200)]

SERVICES = ("kafka", "topics", "trainer", "worker", "serve", "producer", "prometheus")


@dataclass(frozen=True)
class RunningStack:
    compose: ComposeStack
    kafka: str  # bootstrap address from the host
    prometheus: Prometheus
    serve_url: str
    started_s: float  # `up` until the producer runs


@pytest.fixture(scope="module")
def stack() -> Iterator[RunningStack]:
    podman = Podman.for_this_host()
    with run_scope(podman):
        ports = {
            name: str(free_port("127.0.0.1"))
            for name in ("KAFKA_HOST_PORT", "PROMETHEUS_HOST_PORT", "SERVE_HOST_PORT")
        }
        compose = ComposeStack(
            podman,
            variables={**stack_images(podman), **ports, "GRAFANA_HOST_PORT": "1"},
            extra_env={"trainer": {"VAEWATCH_TRAIN__EPOCHS": "1"}},
        )
        start = time.monotonic()
        compose.up(*SERVICES, timeout_s=600)
        started_s = time.monotonic() - start
        print(f"deploy-test: compose stack up in {started_s:.0f} s (to the producer's start)")
        yield RunningStack(
            compose=compose,
            kafka=f"127.0.0.1:{ports['KAFKA_HOST_PORT']}",
            prometheus=Prometheus(f"http://127.0.0.1:{ports['PROMETHEUS_HOST_PORT']}"),
            serve_url=f"http://127.0.0.1:{ports['SERVE_HOST_PORT']}",
            started_s=started_s,
        )


def _stream(stack: RunningStack) -> dict[str, str]:
    return {
        key.removeprefix("VAEWATCH_STREAM__").lower(): value
        for key, value in stack.compose.services["worker"]["environment"].items()
        if key.startswith("VAEWATCH_STREAM__")
    }


def test_alerts_arrive_on_the_alert_topic(stack: RunningStack) -> None:
    stream = _stream(stack)
    consumer = KafkaConsumer(bootstrap_servers=stack.kafka, consumer_timeout_ms=1000)
    try:
        partitions = [
            TopicPartition(stream["alert_topic"], p)
            for p in consumer.partitions_for_topic(stream["alert_topic"])
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        alerts: list[dict] = []

        def enough() -> bool:
            alerts.extend(json.loads(record.value) for record in consumer)
            return len(alerts) >= 50

        wait_for(enough, timeout_s=240, interval_s=0, what="50 alerts on the alert topic")
    finally:
        consumer.close()
    for alert in alerts:
        assert alert["anomaly"] is True and alert["topic"] == stream["input_topic"], alert
        assert alert["score"] > alert["threshold"], alert
        assert alert["id"], alert  # `vaewatch produce` gives every record an id header


def test_prometheus_holds_the_worker_series(stack: RunningStack) -> None:
    prometheus = stack.prometheus
    wait_for(
        lambda: (prometheus.value('sum(vaewatch_records_total{job="vaewatch"})') or 0) > 0,
        timeout_s=120,
        what="the worker's records_total in Prometheus",
    )
    assert prometheus.value('min(up{job="vaewatch"})') == 1
    assert prometheus.value('min(up{job="vaewatch-serve"})') == 1
    assert prometheus.value('max(vaewatch_ready{job="vaewatch"})') == 1


def test_every_rule_is_loaded_and_none_is_in_error(stack: RunningStack) -> None:
    prometheus = stack.prometheus
    expected = {
        rule.get("record") or rule["alert"]
        for group in load_yaml(RULES)["groups"]
        for rule in group["rules"]
    }

    def all_evaluated() -> list[dict]:
        rules = prometheus.rules()
        return rules if all(rule["health"] != "unknown" for rule in rules) else []

    rules = wait_for(all_evaluated, timeout_s=120, interval_s=2, what="every rule evaluated")
    assert {rule["name"] for rule in rules} == expected
    broken = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not broken, broken
    # The stream has 20% anomalies: the anomaly-rate alert goes pending (then fires after 2m).
    wait_for(
        lambda: any(
            alert["labels"]["alertname"] == "VaewatchAnomalyRateHigh"
            for alert in prometheus.alerts()
        ),
        timeout_s=240,
        interval_s=5,
        what="VaewatchAnomalyRateHigh pending",
    )


def test_serve_answers_readyz(stack: RunningStack) -> None:
    with urllib.request.urlopen(f"{stack.serve_url}/readyz", timeout=10) as response:
        assert response.status == 200


def test_sigterm_drains_the_worker_and_exits_0(stack: RunningStack) -> None:
    """Last: it stops the worker. `podman stop` sends the image's STOPSIGNAL (SIGTERM) through
    compose's init to the worker, which finishes its batch, commits, leaves the group, exits 0."""
    podman = stack.compose.podman
    worker = stack.compose.container("worker")
    assert podman.state(worker)["Running"]
    start = time.monotonic()
    podman.run("stop", worker, timeout_s=120)
    took = time.monotonic() - start
    state = podman.state(worker)
    logs = podman.logs(worker)
    assert state["ExitCode"] == 0, f"worker exited {state['ExitCode']}:\n{logs[-3000:]}"
    assert "draining and stopping" in logs and "worker stopped" in logs, logs[-3000:]
    assert took < 45, f"the drain took {took:.1f} s, past compose's stop_grace_period"
    print(f"deploy-test: SIGTERM to the worker container: exit 0 after {took:.1f} s")
    # Left the group on the way out: no member is left waiting for its session to time out.
    group_id = _stream(stack)["group_id"]
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka)
    try:
        group = admin.describe_groups([group_id])[group_id]
    finally:
        admin.close()
    assert group["group_state"] == "Empty" and not group["members"], group
