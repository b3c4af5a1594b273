"""deploy/k8s/'s worker Deployment for real (`make deploy-test`): `podman kube play` runs it with
its ConfigMap, Secret and bundle volume beside a Kafka container (compose.yaml's kafka and
topics services), from the image `make image` built. What had to change for podman is in
tests/deploy/kube_play.py, and deploy/README.md says which parts of deploy/k8s/ ran and which are
only checked statically (test_static.py: KEDA's ScaledObject, the ServiceMonitors, the
PrometheusRule, the Jobs, the Services).

Podman 4.3 honours the liveness probe only: it becomes the container's health check, with a
restart on failure. Readiness and startup probes are ignored, so the test asks the readiness
probe's URL itself, as the kubelet would. Nothing runs health checks on a host without systemd
(no timers), so the test runs the liveness check at the probe's period.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.brokers.local import free_port
from tests.deploy.compose_stack import ComposeStack
from tests.deploy.containers import (
    LABEL,
    VAEWATCH_IMAGE,
    Podman,
    run_scope,
    stack_images,
    wait_for,
)
from tests.deploy.kube_play import WorkerPlay, render_worker, secret_json

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1200)]

N_RECORDS = 2000


@dataclass
class PlayedWorker:
    podman: Podman
    play: WorkerPlay
    kafka: str  # bootstrap address from the host
    ip: str  # the pod's address on the test network
    started_s: float = 0.0  # kube play until the readiness probe passes

    @property
    def container(self) -> str:
        return self.play.container_name("worker")

    @property
    def spec(self) -> dict[str, Any]:
        (container,) = self.play.deployment["spec"]["template"]["spec"]["containers"]
        return container

    def probe_url(self, kind: str) -> str:
        http = self.spec[kind]["httpGet"]
        assert isinstance(http["port"], int), f"{kind}: port by number (podman 4.3 needs it)"
        return f"http://{self.ip}:{http['port']}{http['path']}"


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _bundle_tar(bundle: Path, name: str) -> bytes:
    """The bundle under <name>/, owned by the image's user (uid 10001), for `volume import`."""

    def owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 10001
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(bundle, arcname=name, filter=owned)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def played(
    trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PlayedWorker]:
    podman = Podman.for_this_host()
    folder = tmp_path_factory.mktemp("kube")
    with run_scope(podman):
        kafka_port = str(free_port("127.0.0.1"))
        compose = ComposeStack(
            podman, variables={**stack_images(podman), "KAFKA_HOST_PORT": kafka_port}
        )
        compose.up("topics", timeout_s=300)
        compose.wait_for_condition("topics", "service_completed_successfully", 300)
        play = render_worker(
            prefix=podman.prefix,
            image=VAEWATCH_IMAGE,
            # Where compose's own worker finds the broker: its listener for the network.
            bootstrap_servers=compose.services["worker"]["environment"][
                "VAEWATCH_STREAM__BOOTSTRAP_SERVERS"
            ],
            labels={LABEL: str(podman.run_id)},
        )
        (container,) = play.deployment["spec"]["template"]["spec"]["containers"]
        bundle_name = next(e["value"] for e in container["env"] if e["name"] == "MODEL_BUNDLE")
        (claim,) = play.claims
        podman.run("volume", "create", *podman.label, claim)
        archive = folder / "bundle.tar"
        archive.write_bytes(_bundle_tar(trained_bundle, bundle_name))
        podman.run("volume", "import", claim, str(archive))
        for name, values in play.secrets.items():
            data = folder / f"{name}.json"
            data.write_text(secret_json(values))
            podman.run("secret", "create", *podman.label, name, str(data))
        manifest = folder / "worker.yaml"
        manifest.write_text(play.yaml())

        start = time.monotonic()
        podman.run("kube", "play", "--network", compose.network, str(manifest), timeout_s=300)
        infra = podman.out("pod", "inspect", "--format", "{{.InfraContainerID}}", play.pod_name)
        worker = PlayedWorker(podman, play, f"127.0.0.1:{kafka_port}", podman.ip_address(infra))
        _wait_ready(worker)
        worker.started_s = time.monotonic() - start
        print(f"deploy-test: kube play to the readiness probe passing in {worker.started_s:.0f} s")
        yield worker


def _wait_ready(worker: PlayedWorker) -> None:
    """Until the readiness probe's URL answers 200, asked at the probe's period."""
    wait_for(
        lambda: _get(worker.probe_url("readinessProbe"))[0] == 200,
        timeout_s=300,
        interval_s=worker.spec["readinessProbe"]["periodSeconds"],
        what="the readiness probe to pass",
        detail=lambda: worker.podman.logs(worker.container)[-3000:],
    )


def _records_scored(metrics_text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "vaewatch_records_total"
        and sample.labels.get("outcome") in ("normal", "anomaly")
    )


def test_the_worker_pod_passes_its_readiness_probe(played: PlayedWorker) -> None:
    status, body = _get(played.probe_url("readinessProbe"))
    assert status == 200, body
    report = json.loads(body)
    assert report["ready"] is True and all(report["checks"].values()), report


def test_podman_honours_the_liveness_probe_only(played: PlayedWorker) -> None:
    """What podman 4.3 makes of the three probes: the liveness probe becomes the container's
    health check (its command, period, timeout and threshold, restart on failure); the readiness
    and startup probes leave no trace (no start period either)."""
    check = json.loads(played.podman.inspect(played.container, "{{json .Config.Healthcheck}}"))
    liveness = played.spec["livenessProbe"]
    assert " ".join(liveness["exec"]["command"]) in " ".join(check["Test"]), check
    assert check["Interval"] == liveness["periodSeconds"] * 10**9, check
    assert check["Timeout"] == liveness["timeoutSeconds"] * 10**9, check
    assert check["Retries"] == liveness["failureThreshold"], check
    assert check.get("StartPeriod", 0) == 0, check
    assert played.spec["readinessProbe"]["httpGet"]["path"] not in json.dumps(check)
    action = played.podman.inspect(played.container, "{{.Config.HealthcheckOnFailureAction}}")
    assert action == "restart"
    assert played.podman.health_check(played.container), "the liveness probe fails"


def test_the_worker_scores_records_from_the_kafka_container(played: PlayedWorker) -> None:
    vaewatch = Path(sys.executable).with_name("vaewatch")
    subprocess.run(
        [
            str(vaewatch), "--log-level", "WARNING",
            "--set", f"stream.bootstrap_servers={played.kafka}",
            "produce", "--count", str(N_RECORDS), "--rate", "0", "--codec", "raw",
            "--anomaly-fraction", "0.2",
        ],
        check=True,
        timeout=300,
    )  # fmt: skip
    metrics = f"http://{played.ip}:{played.spec['ports'][0]['containerPort']}/metrics"

    def scored() -> bool:
        text = _get(metrics)[1].decode()
        return _records_scored(text) >= N_RECORDS

    wait_for(scored, timeout_s=300, interval_s=2, what=f"{N_RECORDS} records scored")


def test_the_init_containers_command_waits_for_the_bundle(played: PlayedWorker) -> None:
    """podman 4.3 cannot run the init container in the Deployment (kube_play.py): its command
    runs here as a plain container on the same volume, found bundle and missing one."""
    (init,) = played.play.init_containers
    (claim,) = played.play.claims
    mount = next(m for m in init["volumeMounts"] if m["name"] == "models")

    def run(bundle: str, name: str) -> None:
        played.podman.run(
            "run", "--detach", "--name", played.podman.prefix + name, *played.podman.label,
            "--user", "10001:10001", "--volume", f"{claim}:{mount['mountPath']}:ro",
            "--env", f"MODEL_BUNDLE={bundle}", "--entrypoint", json.dumps(init["command"]),
            VAEWATCH_IMAGE, *init["args"],
        )  # fmt: skip

    found = next(e["value"] for e in init["env"] if e["name"] == "MODEL_BUNDLE")
    run(found, "init-found")
    assert played.podman.wait_exit(played.podman.prefix + "init-found", timeout_s=60) == 0
    run("not-there", "init-missing")
    missing = played.podman.prefix + "init-missing"
    wait_for(
        lambda: "waiting for /models/not-there" in played.podman.logs(missing),
        timeout_s=60,
        what="the init command to say it waits",
    )
    assert played.podman.state(missing)["Running"], played.podman.logs(missing)


def test_a_frozen_worker_is_restarted_by_its_liveness_probe(played: PlayedWorker) -> None:
    """Last: it freezes the worker process (SIGSTOP: a process stuck in a call answers no
    /healthz), runs the liveness check at the probe's period, and expects podman to restart the
    container and the pod to become ready again.

    A second container keeps the pod running meanwhile, as a cluster's pod keeps running while
    the kubelet restarts one of its containers. Without it, podman 4.3 races itself: a
    kube-played pod has the exit policy "stop" (settable for kube play only from podman 4.6 on,
    io.podman.kube.exit.policy), so when the liveness restart has stopped the worker, the pod's
    last container, the container's cleanup stopped the whole pod before the restart started
    it again: "pod stop" right after "container died" in `podman events`, in 4 of 6 runs."""
    podman, container = played.podman, played.container
    liveness = played.spec["livenessProbe"]
    podman.run(
        "run", "--detach", "--pod", played.play.pod_name, *podman.label, "--no-healthcheck",
        "--name", f"{played.play.pod_name}-keeps-the-pod", "--entrypoint", "sleep",
        VAEWATCH_IMAGE, "infinity",
    )  # fmt: skip
    before = podman.state(container)
    os.kill(int(before["Pid"]), signal.SIGSTOP)
    restarted_after = None
    start = time.monotonic()
    for _ in range(liveness["failureThreshold"] + 2):
        podman.health_check(container)
        state = podman.state(container)
        if state["StartedAt"] != before["StartedAt"]:
            restarted_after = time.monotonic() - start
            break
        time.sleep(liveness["periodSeconds"])
    pod_state = podman.out("pod", "inspect", "--format", "{{.State}}", played.play.pod_name)
    assert restarted_after is not None, (
        f"not restarted; container {podman.state(container)['Status']}, pod {pod_state}"
    )
    _wait_ready(played)
    print(
        f"deploy-test: frozen worker restarted {restarted_after:.0f} s after the freeze, "
        f"ready again {time.monotonic() - start:.0f} s after it"
    )
