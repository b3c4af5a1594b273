"""Every HTTP endpoint that deploy/ names is one that vaewatch serves: each health check, probe,
scrape target, annotation, Service and ServiceMonitor points at the port of the process behind
it (its settings as deployed: the config file, the image's and the container's environment),
at a path its app answers, and speaks its scheme (HTTPS where the settings give the process a
certificate). A port, path or scheme vaewatch does not have fails here, naming the file and the
place; test_static.py does the same for settings names and CLI arguments, test_secured.py runs
these checks on the secured variant."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
import yaml
from prometheus_client import CollectorRegistry

from serve.app import create_app
from serve.config import ServeConfig
from serve.metrics import ServeMetrics
from streams.worker.health import build_app
from tests.deploy.deploy_files import (
    COMPOSE,
    DOCKERFILE,
    PROMETHEUS_CONFIG,
    dockerfile_env,
    dockerfile_instructions,
    env_dict,
    k8s_documents,
    load_yaml,
)
from tests.deploy.test_static import (
    IMAGE_CMD,
    IMAGE_ENTRYPOINT,
    _container_env,
    _image_settings,
    _interpolate,
    _parse_vaewatch,
    _service_command,
    _settings,
)
from vaewatch.config import Settings

_URL = re.compile(r"(https?)://[^/\s'\":]+:(\d+|%s)(/[A-Za-z0-9_./-]*)")


@dataclass(frozen=True)
class Endpoint:
    where: str  # file and place, for the message
    process: str  # "worker" or "serve": the vaewatch command behind it
    port: int
    path: str | None  # None: a port alone (containerPort, expose)
    expected_port: int  # that process's port in its settings as deployed
    scheme: str | None = None  # http or https where the place says (None: a port alone)
    expected_scheme: str = "http"  # https when the process's settings give it a certificate


def _port_of(process: str, settings: Settings) -> int:
    return settings.metrics.port if process == "worker" else settings.serve.port


def _scheme_of(process: str, settings: Settings) -> str:
    tls = settings.metrics.tls_cert_file if process == "worker" else settings.serve.ssl_certfile
    return "https" if tls else "http"


def _urls(text: str, default_port: int | None = None) -> list[tuple[str, int, str]]:
    found = []
    for scheme, port, path in _URL.findall(text):
        found.append((scheme, default_port if port == "%s" else int(port), path))
    return found


# -- where deploy/ names endpoints --------------------------------------------------------------


def _dockerfile() -> list[Endpoint]:
    """The image's HEALTHCHECK (default command: the worker)."""
    check = next(rest for name, rest in dockerfile_instructions() if name == "HEALTHCHECK")
    default = int(re.search(r"'VAEWATCH_METRICS__PORT', '(\d+)'", check).group(1))
    process = _parse_vaewatch(IMAGE_ENTRYPOINT[1:] + IMAGE_CMD).command
    settings = _image_settings()
    return [
        Endpoint(f"{DOCKERFILE.name} HEALTHCHECK", process, port, path,
                 _port_of(process, settings), scheme, _scheme_of(process, settings))
        for scheme, port, path in _urls(check, default)
    ]  # fmt: skip


def _compose(text: str) -> list[Endpoint]:
    return compose_endpoints(yaml.safe_load(_interpolate(text))["services"], COMPOSE.name)


def compose_endpoints(services: dict[str, Any], file: str) -> list[Endpoint]:
    """The endpoints of compose `services` (one file, or several merged)."""
    found = []
    for name, service in services.items():
        if not str(service.get("image", "")).startswith("vaewatch:"):
            continue
        if service.get("entrypoint"):
            continue  # a shell script (the trainer): no endpoint
        process = _parse_vaewatch(IMAGE_ENTRYPOINT[1:] + _service_command(service)).command
        if process not in ("worker", "serve"):
            continue
        settings = _image_settings(env_dict(service.get("environment")))
        expected, scheme_expected = _port_of(process, settings), _scheme_of(process, settings)
        where = f"{file} {name}"
        check = service.get("healthcheck", {})
        for scheme, port, path in _urls(" ".join(check.get("test", []))):
            found.append(
                Endpoint(f"{where} healthcheck", process, port, path, expected, scheme,
                         scheme_expected)
            )  # fmt: skip
        for port in service.get("expose", []):
            found.append(Endpoint(f"{where} expose", process, int(port), None, expected))
        for mapping in service.get("ports", []):
            container_port = int(str(mapping).rsplit(":", 1)[1])
            found.append(Endpoint(f"{where} ports", process, container_port, None, expected))
    return found


def prometheus_endpoints(
    config: Path, services: dict[str, Any], expected: dict[str, Settings] | None = None
) -> list[Endpoint]:
    """The scrape jobs of `config`: vaewatch (the workers) and vaewatch-serve, against the
    settings of compose's worker and serve `services` (or `expected`, by process)."""
    if expected is None:
        expected = {
            process: _image_settings(env_dict(services[process]["environment"]))
            for process in ("worker", "serve")
        }
    found = []
    for job in load_yaml(config)["scrape_configs"]:
        process = {"vaewatch": "worker", "vaewatch-serve": "serve"}[job["job_name"]]
        settings = expected[process]
        for sd in job.get("dns_sd_configs", []):
            found.append(
                Endpoint(
                    f"{config.name} job {job['job_name']}",
                    process,
                    sd["port"],
                    job.get("metrics_path", "/metrics"),
                    _port_of(process, settings),
                    job.get("scheme", "http"),
                    _scheme_of(process, settings),
                )
            )
    return found


def k8s_endpoints(documents: list[tuple[Path, dict[str, Any]]], folder: Path) -> list[Endpoint]:
    """Deployments' containers (ports, probes, scrape annotations), the Services that select
    their pods, and the ServiceMonitors on those Services. The settings of a container: its
    ConfigMap's config.yaml (written into `folder`), the image's environment, the container's."""
    configmaps = {d["metadata"]["name"]: d for _, d in documents if d.get("kind") == "ConfigMap"}
    found: list[Endpoint] = []
    pods = []  # (labels, process, {port name: number}, (expected port, expected scheme))

    def endpoint(where: str, process: str, port: int, path: str | None, expected: tuple[int, str],
                 scheme: str | None = None) -> Endpoint:  # fmt: skip
        return Endpoint(where, process, port, path, expected[0], scheme, expected[1])

    for path, doc in documents:
        if doc.get("kind") != "Deployment":
            continue
        template = doc["spec"]["template"]
        pod = template["spec"]
        config_file = None
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                config_file = folder / f"{volume['configMap']['name']}.yaml"
                config_file.write_text(
                    configmaps[volume["configMap"]["name"]]["data"]["config.yaml"]
                )
        for container in pod["containers"]:
            env = _container_env(container)
            process = _parse_vaewatch(IMAGE_ENTRYPOINT[1:] + container.get("args", [])).command
            settings = _settings(config_file, dockerfile_env(), env)
            expected = (_port_of(process, settings), _scheme_of(process, settings))
            where = f"{path.name} {doc['metadata']['name']}/{container['name']}"
            named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for name, number in named.items():
                found.append(endpoint(f"{where} port {name}", process, number, None, expected))
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = container.get(kind)
                if not probe:
                    continue
                if "httpGet" in probe:
                    http = probe["httpGet"]
                    assert isinstance(http["port"], int), (
                        f"{where} {kind}: port {http['port']!r} by name; `podman kube play` (4.3) "
                        "turns a named probe port into 0: give the number"
                    )
                    scheme = http.get("scheme", "HTTP").lower()
                    found.append(
                        endpoint(f"{where} {kind}", process, http["port"], http["path"], expected,
                                 scheme)
                    )  # fmt: skip
                command = " ".join(probe.get("exec", {}).get("command", []))
                for scheme, port, url_path in _urls(command):
                    found.append(
                        endpoint(f"{where} {kind}", process, port, url_path, expected, scheme)
                    )
            annotations = template["metadata"].get("annotations", {})
            if "prometheus.io/port" in annotations:
                found.append(
                    endpoint(f"{where} prometheus.io annotations", process,
                             int(annotations["prometheus.io/port"]),
                             annotations.get("prometheus.io/path", "/metrics"), expected,
                             annotations.get("prometheus.io/scheme", "http"))
                )  # fmt: skip
            pods.append((template["metadata"]["labels"], process, named, expected))
    services = {}
    for path, doc in documents:
        if doc.get("kind") != "Service":
            continue
        selector = doc["spec"]["selector"]
        (_, process, named, expected) = next(p for p in pods if selector.items() <= p[0].items())
        for port in doc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            number = named[target] if isinstance(target, str) else target
            where = f"{path.name} Service {doc['metadata']['name']} port {port['name']}"
            found.append(endpoint(where, process, number, None, expected))
            services[(doc["metadata"]["name"], port["name"])] = (doc, process, number, expected)
    for path, doc in documents:
        if doc.get("kind") != "ServiceMonitor":
            continue
        for item in doc["spec"]["endpoints"]:
            (_, process, number, expected) = next(
                s
                for (name, port), s in services.items()
                if port == item["port"]
                and doc["spec"]["selector"]["matchLabels"].items()
                <= s[0]["metadata"]["labels"].items()
            )
            found.append(
                endpoint(f"{path.name} ServiceMonitor {doc['metadata']['name']}", process,
                         number, item.get("path", "/metrics"), expected,
                         item.get("scheme", "http"))
            )  # fmt: skip
    return found


def all_endpoints(folder: Path) -> list[Endpoint]:
    compose_text = COMPOSE.read_text()
    services = yaml.safe_load(_interpolate(compose_text))["services"]
    return (
        _dockerfile()
        + _compose(compose_text)
        + k8s_endpoints(k8s_documents(), folder)
        + prometheus_endpoints(PROMETHEUS_CONFIG, services)
    )


# -- what the processes serve -------------------------------------------------------------------


def _worker_answers(path: str) -> bool:
    app = build_app(registry=CollectorRegistry(), readiness=lambda: (True, {}))
    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    statuses = []
    b"".join(app(environ, lambda status, headers, *rest: statuses.append(status)))
    return not statuses[0].startswith("404")


def _serve_routes() -> set[str]:
    # The route table only: the app is built, never started, so no model is needed.
    registry = CollectorRegistry()
    service = SimpleNamespace(explain_now=None, queued_images=lambda: 0)
    app = create_app(
        service, config=ServeConfig(), registry=registry, metrics=ServeMetrics(registry=registry)
    )
    return {route.path for route in app.routes}


def endpoint_problems(endpoints: list[Endpoint]) -> list[str]:
    serve_routes = _serve_routes()
    problems = []
    for e in endpoints:
        if e.port != e.expected_port:
            problems.append(
                f"{e.where}: port {e.port}, but the {e.process} is on {e.expected_port}"
            )
        if e.scheme is not None and e.scheme != e.expected_scheme:
            problems.append(
                f"{e.where}: {e.scheme}, but the {e.process} speaks {e.expected_scheme}"
            )
        if e.path is not None:
            served = _worker_answers(e.path) if e.process == "worker" else e.path in serve_routes
            if not served:
                problems.append(f"{e.where}: the {e.process} does not serve {e.path}")
    return problems


# -- the tests ----------------------------------------------------------------------------------


def test_every_endpoint_in_deploy_is_one_vaewatch_serves(tmp_path: Path) -> None:
    endpoints = all_endpoints(tmp_path)
    where = {e.where.split()[0] for e in endpoints}
    assert {"Dockerfile", "compose.yaml", "prometheus.yml", "deployment.yaml"} <= where, where
    assert {"serve-deployment.yaml", "service.yaml", "servicemonitor.yaml"} <= where, where
    assert len(endpoints) >= 18
    assert endpoint_problems(endpoints) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("127.0.0.1:9108/readyz", "127.0.0.1:9108/ready", "does not serve /ready"),
        ("127.0.0.1:9108/readyz", "127.0.0.1:9109/readyz", "port 9109"),
    ],
)
def test_the_check_catches_a_wrong_port_or_path_in_compose(
    old: str, new: str, problem: str
) -> None:
    text = COMPOSE.read_text()
    assert old in text
    problems = endpoint_problems(_compose(text.replace(old, new, 1)))
    assert any(problem in p for p in problems), problems


def test_the_check_catches_a_wrong_probe_in_a_manifest(tmp_path: Path) -> None:
    documents = k8s_documents()
    broken = []
    for path, doc in documents:
        if doc.get("kind") == "Deployment" and doc["metadata"]["name"] == "vaewatch-worker":
            doc = yaml.safe_load(yaml.safe_dump(doc).replace("/readyz", "/ready"))
            doc["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "9100"
        broken.append((path, doc))
    problems = endpoint_problems(k8s_endpoints(broken, tmp_path))
    assert any("readinessProbe: the worker does not serve /ready" in p for p in problems)
    assert any("annotations: port 9100" in p for p in problems), problems
