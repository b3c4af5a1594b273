"""deploy/k8s/'s worker (Deployment, ConfigMap, its Secret and bundle volume) made ready for
`podman kube play`, which runs Pods and Deployments on one host.

What a cluster would do, done here as kustomize and the cluster would:
- every name gets the run's prefix (kustomize's namePrefix, references included), so that runs
  never meet each other's pods, volumes or secrets;
- the image is the one `make image` built (kustomize's `images:`);
- the ConfigMap points at the test's Kafka container and scores on the CPU (this host has no GPU;
  `nvidia.com/gpu` requests go too);
- $(VAR) in args is expanded from the container's env, as the kubelet does: podman 4.3 passes it
  through literally;
- the PersistentVolumeClaim is a podman volume made beforehand with the bundle in it (the
  cluster's provisioner and the trainer Job's part);
- the Secret is made with `podman secret create` in the form podman 4.3's secretKeyRef reads
  (a JSON object of base64 values): a `kind: Secret` document played by podman 4.3 is stored
  as YAML, which its own secretKeyRef then fails to parse ("not valid JSON").
And what podman 4.3 cannot run is left out: the init container (podman applies the pod's
restartPolicy Always to it, restarts it, then fails to remove it: "failed to remove once init
container ... as it is running"); the test runs its command as a plain container instead.
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass
from typing import Any

import yaml

from tests.deploy.deploy_files import K8S, k8s_expand, load_yaml_all

# The Secret's value: the ConfigMap's cluster is PLAINTEXT, so it is not used, but the pod does
# not start without the Secret (the manifest requires it).
KAFKA_PASSWORD = "not-used-on-plaintext"


@dataclass(frozen=True)
class WorkerPlay:
    deployment: dict[str, Any]  # as rendered
    configmap: dict[str, Any]
    secrets: dict[str, dict[str, str]]  # prefixed name: {key: value}
    claims: list[str]  # prefixed claim names: podman volumes to make first
    init_containers: list[dict[str, Any]]  # left out of the pod; rendered like the others

    @property
    def pod_name(self) -> str:
        # podman kube play names a Deployment's pod <name>-pod-0, its containers <pod>-<name>.
        return f"{self.deployment['metadata']['name']}-pod-0"

    def container_name(self, container: str) -> str:
        return f"{self.pod_name}-{container}"

    def yaml(self) -> str:
        return yaml.safe_dump_all([self.configmap, self.deployment], sort_keys=False)


def _one(kind: str, name: str) -> dict[str, Any]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml_all(path):
            if doc.get("kind") == kind and doc["metadata"]["name"] == name:
                return copy.deepcopy(doc)
    raise AssertionError(f"deploy/k8s/ has no {kind} {name}")


def secret_json(values: dict[str, str]) -> str:
    """A podman secret's data in the form podman 4.3's kube play secretKeyRef reads."""
    return json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in values.items()})


def render_worker(
    *, prefix: str, image: str, bootstrap_servers: str, labels: dict[str, str]
) -> WorkerPlay:
    deployment = _one("Deployment", "vaewatch-worker")
    pod = deployment["spec"]["template"]["spec"]
    configmap_volume = next(v for v in pod["volumes"] if "configMap" in v)
    configmap = _one("ConfigMap", configmap_volume["configMap"]["name"])

    deployment["metadata"]["name"] = prefix + deployment["metadata"]["name"]
    deployment["spec"]["template"]["metadata"]["labels"].update(labels)
    configmap["metadata"]["name"] = prefix + configmap["metadata"]["name"]
    configmap_volume["configMap"]["name"] = configmap["metadata"]["name"]
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    config["stream"]["bootstrap_servers"] = bootstrap_servers
    config["detector"]["device"] = "cpu"
    configmap["data"]["config.yaml"] = yaml.safe_dump(config, sort_keys=False)

    claims = []
    for volume in pod["volumes"]:
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]
            claim["claimName"] = prefix + claim["claimName"]
            claims.append(claim["claimName"])

    secrets: dict[str, dict[str, str]] = {}
    init_containers = pod.pop("initContainers", [])
    for container in [*init_containers, *pod["containers"]]:
        container["image"] = image
        container["imagePullPolicy"] = "Never"
        env = {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
        for key in ("command", "args"):
            if key in container:
                container[key] = [k8s_expand(arg, env) for arg in container[key]]
        for item in container.get("env", []):
            reference = item.get("valueFrom", {}).get("secretKeyRef")
            if reference:
                reference["name"] = prefix + reference["name"]
                secrets.setdefault(reference["name"], {})[reference["key"]] = KAFKA_PASSWORD
        for section in ("requests", "limits"):
            container.get("resources", {}).get(section, {}).pop("nvidia.com/gpu", None)
    return WorkerPlay(deployment, configmap, secrets, claims, init_containers)
