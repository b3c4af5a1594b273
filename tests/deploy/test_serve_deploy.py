"""The HTTP service's deploy files agree with `vaewatch serve`: compose, Kubernetes and the
Prometheus scrape config use its settings' port, its probes and a command that parses."""

from __future__ import annotations

from typing import Any

import yaml

from tests.deploy.deploy_files import (
    COMPOSE,
    PROMETHEUS_CONFIG,
    SERVE_JOB,
    env_dict,
    k8s_expand,
    k8s_kind,
    load_yaml,
)
from tests.deploy.test_static import (
    IMAGE_ENTRYPOINT,
    _container_env,
    _image_settings,
    _interpolate,
    _parse_vaewatch,
)


def _compose_serve() -> dict[str, Any]:
    return yaml.safe_load(_interpolate(COMPOSE.read_text()))["services"]["serve"]


def test_compose_serve_service_agrees_with_its_settings() -> None:
    serve = _compose_serve()
    settings = _image_settings(env_dict(serve["environment"]))
    args = _parse_vaewatch(IMAGE_ENTRYPOINT[1:] + list(serve["command"]))
    assert args.command == "serve" and args.live_alerts
    assert settings.serve.host == "0.0.0.0", "inside a container it must listen beyond loopback"
    port = settings.serve.port
    assert serve["ports"] == [f"127.0.0.1:{port}:{port}"], "published on the host's loopback"
    check = " ".join(serve["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/readyz" in check
    mounts = {v.split(":")[1]: v.split(":")[0] for v in serve["volumes"]}
    assert any(str(args.model).startswith(m) for m in mounts)
    worker_env = env_dict(
        yaml.safe_load(_interpolate(COMPOSE.read_text()))["services"]["worker"]["environment"]
    )
    worker = _image_settings(worker_env).stream
    assert settings.stream.bootstrap_servers == worker.bootstrap_servers
    assert settings.stream.alert_topic == worker.alert_topic

    scrape = next(
        j for j in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"] if j["job_name"] == SERVE_JOB
    )
    sd = scrape["dns_sd_configs"][0]
    assert sd["names"] == ["serve"] and sd["port"] == port
    assert scrape["metrics_path"] == "/metrics"


def test_k8s_serve_deployment_service_and_monitor() -> None:
    (deployment,) = [d for d in k8s_kind("Deployment") if d["metadata"]["name"] == SERVE_JOB]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = _container_env(container)
    settings = _image_settings(env)
    port = settings.serve.port
    args = _parse_vaewatch(IMAGE_ENTRYPOINT[1:] + [k8s_expand(a, env) for a in container["args"]])
    assert args.command == "serve"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": port}
    assert "/healthz" in " ".join(container["livenessProbe"]["exec"]["command"])
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (service,) = [s for s in k8s_kind("Service") if s["metadata"]["name"] == SERVE_JOB]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in ("http", port)
    (monitor,) = [m for m in k8s_kind("ServiceMonitor") if m["metadata"]["name"] == SERVE_JOB]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service_port["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # The worker's Service and monitor do not pick the serve pods up (they would be scraped as
    # job="vaewatch", and the worker's alert rules would count them).
    (worker_service,) = [s for s in k8s_kind("Service") if s["metadata"]["name"] == "vaewatch"]
    assert not worker_service["spec"]["selector"].items() <= labels.items()


def test_dashboard_serve_row_selects_the_serve_job() -> None:
    from tests.deploy.deploy_files import dashboard_queries

    serve_queries = [q for q in dashboard_queries() if "vaewatch_serve_" in q.expr]
    assert len(serve_queries) >= 6
    for query in serve_queries:
        assert f'job="{SERVE_JOB}"' in query.expr, query
    assert any("vaewatch_serve_request_duration_seconds_bucket" in q.expr for q in serve_queries)
