"""Static checks of deploy/: every file parses; every VAEWATCH_* variable is a real settings key;
compose, Kubernetes, the Dockerfile and the Prometheus scrape config agree with the worker on
ports, probes, topics, groups and paths; the dashboard and the rules only use metrics the worker
exports (streams/worker/metrics.py) or recording rules from rules.yml."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

from streams.brokers.kafka_jars import kafka_version
from tests.deploy.deploy_files import (
    COMPOSE,
    COMPOSE_GPU,
    DASHBOARD,
    DEPLOY,
    DOCKERFILE,
    GRAFANA_PROVISIONING,
    JOB,
    K8S,
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    REPO_CONFIG,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    dockerfile_env,
    dockerfile_exec_form,
    dockerfile_instructions,
    env_dict,
    exported_metric_families,
    exported_series_names,
    k8s_documents,
    k8s_expand,
    k8s_kind,
    label_values_metric,
    load_yaml,
    load_yaml_all,
    promql_metric_names,
    recording_rule_names,
    rules,
    shell_expand,
    template_queries,
)
from vaewatch.cli import build_parser
from vaewatch.config import ConfigError, Settings, load_settings

# -- helpers ------------------------------------------------------------------------------------


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} with no VAR set: the default. A bare ${VAR} is an error here
    (the stack must come up with no .env file)."""

    def default(match: re.Match[str]) -> str:
        body = match.group(1)
        if ":-" in body:
            return body.split(":-", 1)[1]
        raise AssertionError(f"${{{body}}} has no default: `docker compose up` alone would fail")

    return re.sub(r"\$\{([^}]*)\}", default, text)


def compose() -> dict[str, Any]:
    return yaml.safe_load(_interpolate(COMPOSE.read_text()))


def _container_env(container: dict[str, Any]) -> dict[str, str | None]:
    """Kubernetes env: value, or None for valueFrom (a Secret, a field of the pod)."""
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def _parse_vaewatch(argv: list[str]) -> Any:
    """argv after `vaewatch`, parsed by the real CLI parser (a wrong flag fails here)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`vaewatch {shlex.join(argv)}` does not parse") from exc


IMAGE_ENTRYPOINT = dockerfile_exec_form("ENTRYPOINT")
IMAGE_CMD = dockerfile_exec_form("CMD")


def _image_config_path() -> str:
    assert IMAGE_ENTRYPOINT[:2] == ["vaewatch", "--config"], IMAGE_ENTRYPOINT
    return IMAGE_ENTRYPOINT[2]


def _settings(config_file: Path | None, *envs: dict[str, Any]) -> Settings:
    env: dict[str, str] = {}
    for e in envs:
        env.update({k: ("x" if v is None else str(v)) for k, v in e.items()})
    return load_settings(config_file, env=env)


def _image_settings(*envs: dict[str, Any]) -> Settings:
    """What the image's entrypoint loads: the repository's config.yaml (copied to
    /etc/vaewatch/config.yaml), the Dockerfile's ENV, then the given environments."""
    copies = [
        rest.split()
        for name, rest in dockerfile_instructions()
        if name == "COPY" and rest.split()[-1] == _image_config_path()
    ]
    assert copies == [["config.yaml", _image_config_path()]], copies
    return _settings(REPO_CONFIG, dockerfile_env(), *envs)


def _all_env_sources() -> list[tuple[str, dict[str, str | None]]]:
    sources: list[tuple[str, dict[str, str | None]]] = [("Dockerfile ENV", dict(dockerfile_env()))]
    for path in (COMPOSE, COMPOSE_GPU):
        services = yaml.safe_load(_interpolate(path.read_text()))["services"]
        for name, service in services.items():
            sources.append((f"{path.name}:{name}", dict(env_dict(service.get("environment")))))
    for path, doc in k8s_documents():
        spec = doc.get("spec", {})
        template = spec.get("template", {}).get("spec", {})
        for container in [*template.get("initContainers", []), *template.get("containers", [])]:
            sources.append((f"{path.name}:{container['name']}", _container_env(container)))
    return sources


# -- everything parses --------------------------------------------------------------------------


def test_every_deploy_file_parses() -> None:
    yaml_files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(yaml_files) >= 15
    for path in yaml_files:
        docs = load_yaml_all(path)
        assert docs, f"{path}: empty"
    json.loads(DASHBOARD.read_text())
    kinds = {doc.get("kind") for _, doc in k8s_documents()}
    for kind in (
        "Deployment",
        "Service",
        "ConfigMap",
        "PersistentVolumeClaim",
        "ServiceMonitor",
        "ScaledObject",
        "Kustomization",
    ):
        assert kind in kinds, f"deploy/k8s/ has no {kind}"
    listed = set(
        next(doc for _, doc in k8s_documents() if doc.get("kind") == "Kustomization")["resources"]
    )
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"kustomization.yaml resources {listed} != files {on_disk}"


# -- environment variables ----------------------------------------------------------------------


def test_a_wrong_settings_key_is_caught() -> None:
    """The mechanism below really rejects misspelt keys and sections."""
    with pytest.raises(ConfigError):
        load_settings(None, env={"VAEWATCH_STREAM__BOOTSTRAP_SERVER": "kafka:9092"})
    with pytest.raises(ConfigError):
        load_settings(None, env={"VAEWATCH_STREAMS__BOOTSTRAP_SERVERS": "kafka:9092"})


def check_vaewatch_env(source: str, env: dict[str, str | None]) -> int:
    """Every VAEWATCH_* variable of `env` is a real settings key, and together they are valid
    settings with the values as written (None: from a Secret or a field, only the key is
    checked); how many there were."""
    names = {name: value for name, value in env.items() if name.startswith("VAEWATCH_")}
    for name in names:
        assert "__" in name, (
            f"{source}: {name} is ignored by vaewatch (settings variables are "
            "VAEWATCH_<SECTION>__<KEY>)"
        )
    try:
        settings = load_settings(
            None, env={name: "x" if value is None else value for name, value in names.items()}
        )
    except ConfigError as exc:
        raise AssertionError(f"{source}: {exc}") from None
    for name, value in names.items():
        section, _, key = name[len("VAEWATCH_") :].lower().partition("__")
        assert key in type(getattr(settings, section)).model_fields, f"{source}: {name}"
        if value is not None:
            got = getattr(getattr(settings, section), key)
            want = yaml.safe_load(value) if value.strip() else ""
            if hasattr(got, "get_secret_value"):
                got, want = got.get_secret_value(), value
            if isinstance(got, tuple):
                got = list(got)
            assert got == want, f"{source}: {name}={value!r} gives {section}.{key}={got!r}"
    return len(names)


def test_every_vaewatch_env_var_is_a_settings_key() -> None:
    seen = sum(check_vaewatch_env(source, env) for source, env in _all_env_sources())
    assert seen >= 15


# -- the image ----------------------------------------------------------------------------------


def test_dockerfile_torch_pins_are_the_projects() -> None:
    """The CPU image's torch and torchvision pins are inside pyproject.toml's ranges and equal
    to their upper bounds, the builds the test suite runs on; the image installs every other
    dependency of pyproject.toml (deploy/image_requirements.py)."""
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1]
        for name, rest in dockerfile_instructions()
        if name == "ARG" and "=" in rest
    }
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    ranges = {
        Requirement(d).name: Requirement(d).specifier for d in project["project"]["dependencies"]
    }
    for package, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        assert args[arg] in ranges[package], f"{arg}={args[arg]} is outside {ranges[package]}"
        assert f"<={args[arg]}" in str(ranges[package]), (package, args[arg], ranges[package])
    script, pyproject = DEPLOY / "image_requirements.py", DEPLOY.parent / "pyproject.toml"
    listed = subprocess.run(
        [sys.executable, str(script), str(pyproject)], capture_output=True, text=True, check=True
    ).stdout.split()
    wanted = [*project["build-system"]["requires"], *project["project"]["dependencies"]]
    assert listed == [d for d in wanted if Requirement(d).name not in ("torch", "torchvision")]


def test_dockerfile_image_contract() -> None:
    instructions = dockerfile_instructions()
    names = [name for name, _ in instructions]
    text = DOCKERFILE.read_text()
    # CUDA-capable PyTorch base and a CPU variant, picked by a build argument.
    froms = [rest for name, rest in instructions if name == "FROM"]
    assert any("base-${VARIANT}" in f for f in froms), froms
    assert re.search(r"ARG CUDA_IMAGE=pytorch/pytorch:[\w.\-]+cuda[\w.\-]+", text)
    assert re.search(r"download\.pytorch\.org/whl/cpu", text)
    # Non-root at run time.
    users = [rest for name, rest in instructions if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    # The bundle: baked from a build argument, or mounted over the default --model path.
    assert "ARG MODEL_BUNDLE" in text
    args = _parse_vaewatch(IMAGE_ENTRYPOINT[1:] + IMAGE_CMD)
    assert args.command == "worker"
    assert any(rest.endswith(f" {args.model}") for name, rest in instructions if name == "COPY")
    volumes = json.loads(next(rest for name, rest in instructions if name == "VOLUME"))
    assert any(PurePosixPath(str(args.model)).is_relative_to(v) for v in volumes)
    # Health check on /healthz of the metrics port the worker uses in the image.
    port = _image_settings().metrics.port
    health = next(rest for name, rest in instructions if name == "HEALTHCHECK")
    assert "/healthz" in health
    assert f"'VAEWATCH_METRICS__PORT', '{port}'" in health
    exposed = [rest for name, rest in instructions if name == "EXPOSE"]
    assert exposed == [str(port)], exposed
    assert "ENTRYPOINT" in names
    # What pip installs must be in the build context (the Dockerfile's ignore file keeps them).
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for name, rest in instructions:
        if name == "COPY" and not rest.startswith("--from"):
            for src in rest.replace("--chown=10001:10001", "").split()[:-1]:
                if src.startswith("${"):
                    continue
                assert src not in ignore, f"COPY {src} but the ignore file drops it"
                assert (DEPLOY.parent / src).exists() or src == "README.md", f"COPY {src}: missing"


# -- compose ------------------------------------------------------------------------------------


def _service_command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", IMAGE_CMD)
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_compose_kafka_is_kraft_from_the_official_image() -> None:
    services = compose()["services"]
    kafka = services["kafka"]
    # The version the project's live tests and `make deploy-test` run (the pom's).
    assert kafka["image"] == f"apache/kafka:{kafka_version()}", kafka["image"]
    assert services["topics"]["image"] == kafka["image"]
    (topics,) = _one("Job", "vaewatch-topics")["spec"]["template"]["spec"]["containers"]
    assert topics["image"] == kafka["image"]
    env = env_dict(kafka["environment"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in env
    assert not any("ZOOKEEPER" in key for key in env)
    assert not any("zookeeper" in name for name in services)


def test_compose_publishes_ports_on_loopback_only_and_movable() -> None:
    """Kafka without authentication, Prometheus with its lifecycle API, Grafana's admin and the
    HTTP service are for this host; and a port taken on it (a developer's own broker on 9092)
    must not stop the stack: each published port has a variable."""
    text = COMPOSE.read_text()
    for name, service in compose()["services"].items():
        for mapping in service.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), f"{name} publishes {mapping} widely"
    for line in text.splitlines():
        if line.strip().startswith('- "127.0.0.1:'):
            assert re.search(r"\$\{[A-Z_]+_HOST_PORT:-\d+\}", line), line
    moved = yaml.safe_load(
        _interpolate(text.replace("KAFKA_HOST_PORT:-9092", "KAFKA_HOST_PORT:-19999"))
    )
    kafka_env = env_dict(moved["services"]["kafka"]["environment"])
    assert "PLAINTEXT_HOST://localhost:19999" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert moved["services"]["kafka"]["ports"] == ["127.0.0.1:19999:9092"]


def test_compose_stack_agrees_with_the_worker() -> None:
    doc = compose()
    services = doc["services"]
    for name in ("kafka", "topics", "trainer", "worker", "producer", "prometheus", "grafana"):
        assert name in services, f"compose has no {name} service"

    worker = services["worker"]
    assert "build" in worker and worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (COMPOSE.parent / worker["build"]["context"]).resolve() == DEPLOY.parent
    settings = _image_settings(env_dict(worker.get("environment")))
    port = settings.metrics.port

    # The worker's command, after the image's entrypoint, parses and names a mounted bundle.
    args = _parse_vaewatch(IMAGE_ENTRYPOINT[1:] + _service_command(worker))
    assert args.command == "worker"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    model_mount = next(m for m in mounts if PurePosixPath(str(args.model)).is_relative_to(m))

    # Health: the worker's compose health check asks /readyz on the metrics port.
    check = " ".join(worker["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/readyz" in check, check
    assert services["producer"]["depends_on"]["worker"]["condition"] == "service_healthy"

    # Port: exposed on the compose network, and the one Prometheus scrapes.
    assert [str(p) for p in worker["expose"]] == [str(port)]
    scrape = next(j for j in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"] if j["job_name"] == JOB)
    sd = scrape["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and sd["port"] == port

    # Bootstrap: the broker's in-network advertised listener.
    kafka_env = env_dict(services["kafka"]["environment"])
    advertised = [
        listener.split("://")[1] for listener in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    ]
    assert settings.stream.bootstrap_servers in advertised
    inner = settings.stream.bootstrap_servers

    # Topics: the one-shot service creates every topic the worker uses, on the same broker.
    script = " ".join(_service_command(services["topics"]))
    for topic in (
        settings.stream.input_topic,
        settings.stream.alert_topic,
        settings.stream.dlq_topic,
    ):
        assert re.search(rf"--create --if-not-exists --topic {re.escape(topic)} ", script), topic
    assert f"--bootstrap-server {inner}" in script
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"

    # Trainer: writes the bundle the worker loads, into the volume the worker mounts.
    trainer = services["trainer"]
    script = " ".join(_service_command(trainer))
    train_argv = shlex.split(script.split("exec vaewatch", 1)[1])
    train_args = _parse_vaewatch(train_argv)
    assert train_args.command == "train"
    assert str(train_args.out) == str(args.model)
    assert script.startswith(f"test -f {args.model}/bundle.json "), "trains only when missing"
    trainer_mounts = {v.split(":")[1]: v.split(":")[0] for v in trainer["volumes"]}
    assert trainer_mounts[model_mount] == mounts[model_mount]
    assert worker["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    _image_settings(env_dict(trainer.get("environment")))  # valid settings

    # Producer: `vaewatch produce` of the Fashion-MNIST test set into the worker's input topic.
    producer = services["producer"]
    produce = _parse_vaewatch(IMAGE_ENTRYPOINT[1:] + _service_command(producer))
    assert produce.command == "produce"
    produce_settings = _image_settings(env_dict(producer.get("environment")))
    assert (produce.topic or produce_settings.stream.input_topic) == settings.stream.input_topic
    assert produce_settings.stream.bootstrap_servers == inner
    assert (produce.dataset or produce_settings.data.dataset) == "fashion-mnist"
    assert produce.split == "test"

    # Prometheus: deploy/prometheus mounted where --config.file points; Grafana: provisioning.
    prometheus = services["prometheus"]
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    assert (COMPOSE.parent / prom_mounts["/etc/prometheus"]).resolve() == PROMETHEUS_DIR
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    for rule_file in load_yaml(PROMETHEUS_CONFIG)["rule_files"]:
        assert (PROMETHEUS_DIR / rule_file).is_file()
    grafana = services["grafana"]
    graf_mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert (
        COMPOSE.parent / graf_mounts["/etc/grafana/provisioning"]
    ).resolve() == GRAFANA_PROVISIONING
    provider = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "vaewatch.yml")["providers"][0]
    dash_dir = provider["options"]["path"]
    assert (COMPOSE.parent / graf_mounts[dash_dir]).resolve() == DASHBOARD.parent
    home = env_dict(grafana["environment"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dir}/{DASHBOARD.name}"
    datasource = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"][
        0
    ]
    assert datasource["url"] == "http://prometheus:9090"
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"], "published on the host's loopback"


def test_compose_gpu_overlay_reserves_a_gpu_for_the_worker() -> None:
    overlay = yaml.safe_load(_interpolate(COMPOSE_GPU.read_text()))["services"]
    base = compose()["services"]
    for name in ("worker", "trainer"):
        assert name in base
        devices = overlay[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert overlay[name]["build"]["args"]["VARIANT"] == "cuda"
    assert (
        _image_settings(
            env_dict(base["worker"]["environment"]), env_dict(overlay["worker"]["environment"])
        ).detector.device
        == "cuda"
    )


# -- Kubernetes ---------------------------------------------------------------------------------


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    docs = [d for d in k8s_kind(kind) if name is None or d["metadata"]["name"] == name]
    assert len(docs) == 1, f"expected one {kind} {name or ''}, found {len(docs)}"
    return docs[0]


def _k8s_worker() -> tuple[dict[str, Any], dict[str, Any], Settings]:
    deployment = _one("Deployment", "vaewatch-worker")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    configmap_volume = next(v for v in pod["volumes"] if "configMap" in v)
    configmap = _one("ConfigMap", configmap_volume["configMap"]["name"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == configmap_volume["name"])
    config_path = PurePosixPath(_image_config_path())
    assert mount["mountPath"] == str(config_path.parent), (
        "the ConfigMap must replace the image's config"
    )
    config_text = configmap["data"][config_path.name]
    return deployment, container, config_text


def test_k8s_configmap_values_are_not_overridden_by_the_environment() -> None:
    """A key set in the ConfigMap and again, differently, by the image's or the pod's
    environment would silently not take effect (environment wins over the file)."""
    _, container, config_text = _k8s_worker()
    tree = yaml.safe_load(config_text)
    for source, env in (
        ("Dockerfile", dockerfile_env()),
        ("Deployment", _container_env(container)),
    ):
        for name, value in env.items():
            if not name.startswith("VAEWATCH_") or "__" not in name:
                continue
            section, _, key = name[len("VAEWATCH_") :].lower().partition("__")
            if key in tree.get(section, {}):
                assert value is not None and yaml.safe_load(value) == tree[section][key], (
                    f"configmap.yaml sets {section}.{key}, but {source} env {name} overrides it"
                )


def test_k8s_worker_agrees_with_the_settings(tmp_path: Path) -> None:
    deployment, container, config_text = _k8s_worker()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_text)
    env = _container_env(container)
    settings = _settings(config_file, dockerfile_env(), env)
    port = settings.metrics.port
    pod = deployment["spec"]["template"]["spec"]

    # Port: container, Service, ServiceMonitor and scrape annotations.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": port}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    service = _one("Service", JOB)
    assert service["metadata"]["name"] == JOB, "the ServiceMonitor's job label is the Service name"
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in ("metrics", port)
    monitor = _one("ServiceMonitor", JOB)
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service_port["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"

    # Probes: /healthz (alive) and /readyz (ready); their ports are test_endpoints.py's.
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "/healthz" in " ".join(container["livenessProbe"]["exec"]["command"])
    # The liveness command's own time limit is under the probe's (a frozen worker fails it).
    command = container["livenessProbe"]["exec"]["command"]
    limit = float(command[command.index("--max-time") + 1])
    assert limit < container["livenessProbe"]["timeoutSeconds"]

    # GPU request.
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    assert settings.detector.device in ("cuda", "auto")

    # The command parses; the bundle comes from a PVC mounted where --model points.
    args = _parse_vaewatch(IMAGE_ENTRYPOINT[1:] + [k8s_expand(a, env) for a in container["args"]])
    assert args.command == "worker"
    pvc_volume = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    _one("PersistentVolumeClaim", pvc_volume["persistentVolumeClaim"]["claimName"])
    models_mount = next(m for m in container["volumeMounts"] if m["name"] == pvc_volume["name"])
    assert PurePosixPath(str(args.model)).is_relative_to(models_mount["mountPath"])
    assert models_mount.get("readOnly") is True
    (init,) = pod["initContainers"]
    # Shell variables ($MODEL_BUNDLE), not $(MODEL_BUNDLE): `podman kube play` (4.3) does not
    # expand the latter, and the shell does either way.
    assert "$(" not in " ".join(init["args"]), init["args"]
    waits_for = shell_expand(" ".join(init["args"]), _container_env(init))
    assert f'test -f "{args.model}/bundle.json"' in waits_for, waits_for
    assert any(m["name"] == pvc_volume["name"] for m in init["volumeMounts"])
    assert pod["securityContext"]["runAsNonRoot"] is True

    # The trainer Job writes the same bundle into the same claim.
    trainer = _one("Job", "vaewatch-train-fashion-c0-v1")["spec"]["template"]["spec"]
    (train_container,) = trainer["containers"]
    train_env = _container_env(train_container)
    train_args = _parse_vaewatch(
        IMAGE_ENTRYPOINT[1:] + [k8s_expand(a, train_env) for a in train_container["args"]]
    )
    assert train_args.command == "train" and str(train_args.out) == str(args.model)
    train_pvc = next(v for v in trainer["volumes"] if "persistentVolumeClaim" in v)
    assert (
        train_pvc["persistentVolumeClaim"]["claimName"]
        == pvc_volume["persistentVolumeClaim"]["claimName"]
    )
    _settings(None, dockerfile_env(), train_env)

    # The drain fits in the grace period.
    assert pod["terminationGracePeriodSeconds"] > settings.stream.drain_timeout_s


def _topic_partitions(script: str, bootstrap: str) -> dict[str, int]:
    found = {}
    for line in script.splitlines():
        if "--create" in line:
            assert f"--bootstrap-server {bootstrap}" in line, line
            topic = re.search(r"--topic (\S+)", line).group(1)
            found[topic] = int(re.search(r"--partitions (\d+)", line).group(1))
    return found


def test_keda_scales_on_the_workers_group_and_topic_up_to_the_partition_count(
    tmp_path: Path,
) -> None:
    deployment, container, config_text = _k8s_worker()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_text)
    stream = _settings(config_file, dockerfile_env(), _container_env(container)).stream

    scaled = _one("ScaledObject")
    assert scaled["apiVersion"].startswith("keda.sh/")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    # KEDA's CRD types trigger metadata as map[string]string: quote numbers and booleans.
    assert all(isinstance(v, str) for v in meta.values()), meta
    assert meta["bootstrapServers"] == stream.bootstrap_servers
    assert meta["consumerGroup"] == stream.group_id
    assert meta["topic"] == stream.input_topic
    assert meta["offsetResetPolicy"] == stream.auto_offset_reset
    assert str(meta["allowIdleConsumers"]).lower() == "false"
    assert int(meta["lagThreshold"]) > 0

    topics = _one("Job", "vaewatch-topics")["spec"]["template"]["spec"]["containers"][0]
    partitions = _topic_partitions(topics["args"][0], stream.bootstrap_servers)
    assert {stream.input_topic, stream.alert_topic, stream.dlq_topic} <= partitions.keys()
    low, high = scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]
    assert 1 <= low <= high <= partitions[stream.input_topic], (
        f"maxReplicaCount {high} must not exceed the {partitions[stream.input_topic]} partitions "
        f"of {stream.input_topic}: extra workers would sit idle"
    )
    assert "partition" in (K8S / "scaledobject.yaml").read_text()  # the comment explaining it


def test_compose_topic_partitions_bound_the_worker_count() -> None:
    services = compose()["services"]
    stream = _image_settings(env_dict(services["worker"]["environment"])).stream
    script = "\n".join(_service_command(services["topics"]))
    partitions = _topic_partitions(script, stream.bootstrap_servers)
    assert partitions[stream.input_topic] >= 1
    assert f"--scale worker={partitions[stream.input_topic]}" in COMPOSE.read_text()


# -- dashboard and rules use real metrics ------------------------------------------------------


def _known_names() -> set[str]:
    return exported_series_names() | recording_rule_names() | {"up"}


def test_dashboard_queries_use_only_exported_metrics_or_recording_rules() -> None:
    known = _known_names()
    queries = dashboard_queries()
    assert len(queries) >= 15
    for query in queries:
        names = promql_metric_names(query.expr)
        assert names, f"{query.panel}: no metric in {query.expr!r}"
        unknown = names - known
        assert not unknown, (
            f"panel {query.panel!r} uses {unknown}, which the worker does not export"
        )
    for name, query in template_queries():
        assert label_values_metric(query) in known, f"variable {name}: {query}"


def test_the_name_check_catches_a_wrong_metric_name() -> None:
    known = _known_names()
    assert promql_metric_names("sum(rate(vaewatch_records_scored_total[1m]))") - known
    assert promql_metric_names("vaewatch_consumer_lag") - known


def test_rules_use_only_exported_metrics_or_recording_rules() -> None:
    known = _known_names()
    for rule in rules():
        unknown = promql_metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('record') or rule.get('alert')}: {unknown}"


def test_dashboard_covers_every_exported_metric_and_the_required_panels() -> None:
    used = set().union(*(promql_metric_names(q.expr) for q in dashboard_queries()))
    for family, kind in exported_metric_families().items():
        assert any(name.startswith(family) for name in used), f"no panel shows {family} ({kind})"
    panels = dashboard_panels()
    by_title = {p["title"]: p for p in panels}
    assert len(by_title) == len(panels), "panel titles must be unique"
    assert len({p["id"] for p in panels}) == len(panels)

    anomaly = by_title["Anomaly rate vs target FPR"]
    exprs = [t["expr"] for t in anomaly["targets"]]
    assert any("job:vaewatch_anomaly_rate:ratio_rate" in e for e in exprs)
    assert any("vaewatch_target_fpr" in e for e in exprs)
    heatmap = by_title["Score distribution"]
    assert heatmap["type"] == "heatmap"
    assert heatmap["targets"][0]["format"] == "heatmap"
    assert "vaewatch_score_bucket" in heatmap["targets"][0]["expr"]
    assert "by (le)" in heatmap["targets"][0]["expr"]
    lag = by_title["Consumer lag per partition"]
    assert "partition" in lag["targets"][0]["expr"]


def test_dashboard_uses_the_provisioned_datasource() -> None:
    datasources = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    uids = {d["uid"] for d in datasources if d["type"] == "prometheus"}
    for query in dashboard_queries():
        assert query.datasource_uid in uids, f"{query.panel}: datasource {query.datasource_uid}"
    for var in dashboard()["templating"]["list"]:
        assert var["datasource"]["uid"] in uids
    assert dashboard()["uid"] == "vaewatch"
