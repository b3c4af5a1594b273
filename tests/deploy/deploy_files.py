"""Readers for deploy/'s files, shared by the deploy tests: the YAML and JSON documents, the
metric names the worker exports, the metric names a PromQL expression uses, the dashboard's
queries with Grafana's variables substituted."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from serve.metrics import ServeMetrics
from streams.lifecycle.metrics import LifecycleMetrics
from streams.worker.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rules_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vaewatch.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yaml"
COMPOSE_SECURED = DEPLOY / "compose.secured.yaml"
COMPOSE_SECURED_MTLS = DEPLOY / "compose.secured-mtls.yaml"
PROMETHEUS_SECURED_CONFIG = PROMETHEUS_DIR / "prometheus.secured.yml"
MAKE_DEV_SECRETS = DEPLOY / "secrets" / "make-dev-secrets.sh"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
# The kustomize overlays of K8S (outside it: kustomize refuses an overlay inside its base).
K8S_SECURED = DEPLOY / "k8s-secured"
K8S_SECURED_MTLS = DEPLOY / "k8s-secured-mtls"
REPO_CONFIG = ROOT / "config.yaml"

# The Prometheus job every rule and panel selects.
JOB = "vaewatch"
# The job of `vaewatch serve`, which the dashboard's HTTP service row selects.
SERVE_JOB = "vaewatch-serve"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every manifest under deploy/k8s/ (kustomization.yaml included)."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml_all(path):
            docs.append((path, doc))
    return docs


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_documents() if doc.get("kind") == kind]


def k8s_expand(text: str, env: Mapping[str, str | None]) -> str:
    """The kubelet's $(VAR) expansion in command and args: variables the container defines,
    $$ for a literal $; an undefined one stays as written, as in Kubernetes."""

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        found = env.get(match.group(1))
        return match.group(0) if found is None else found

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, text)


def shell_expand(text: str, env: Mapping[str, str | None]) -> str:
    """The shell's $VAR and ${VAR} for the given variables (a script's own view of its env)."""
    return re.sub(
        r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))",
        lambda m: str(env.get(m.group(1) or m.group(2), m.group(0))),
        text,
    )


# -- compose files ------------------------------------------------------------------------------

_COMPOSE_VARIABLE = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
)


def compose_interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation, from `variables` only (not the environment): $$ is a literal $;
    ${VAR}, $VAR; ${VAR:-default} (unset or empty: the default), ${VAR-default} (unset);
    ${VAR:?message} and ${VAR?message} stop with the message, as `docker compose` does."""

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        how, argument = match.group(2), match.group(3)
        found = variables.get(name)
        present = bool(found) if how and how.startswith(":") else found is not None
        if present:
            return str(found)
        if how and how.endswith("-"):
            return argument
        if how and how.endswith("?"):
            raise AssertionError(f"required variable {name} is missing a value: {argument}")
        raise AssertionError(f"${{{name}}} is not set and has no default")

    return _COMPOSE_VARIABLE.sub(value, text)


def _interpolated(node: Any, variables: Mapping[str, str]) -> Any:
    """Compose interpolates the values of a parsed file (never its keys or comments)."""
    if isinstance(node, dict):
        return {key: _interpolated(value, variables) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolated(item, variables) for item in node]
    return compose_interpolate(node, variables) if isinstance(node, str) else node


def _mount_target(item: Any) -> str:
    """The container path of a volume or the name of a secret (short or long syntax)."""
    if isinstance(item, dict):
        return str(item.get("target") or item["source"])
    parts = str(item).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


# How compose merges a service's sequences across files (the Compose Specification's merge
# rules): commands are replaced, mounts and secrets merged by their target, ports appended.
_REPLACED = {"command", "entrypoint"}
_MERGED_BY_TARGET = {"volumes", "secrets", "configs"}
_APPENDED = {"ports", "expose"}


def _merge_service(base: dict[str, Any], override: dict[str, Any], where: str) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        if old is None or key in _REPLACED:
            merged[key] = value
        elif key == "healthcheck":
            merged[key] = {**old, **value}  # its `test` is replaced whole
        elif isinstance(old, dict) and isinstance(value, dict):
            merged[key] = {**old, **value}  # environment, depends_on, build.args: by key
            if key == "build" and "args" in old and "args" in value:
                merged[key]["args"] = {**old["args"], **value["args"]}
        elif key in _MERGED_BY_TARGET:
            by_target = {_mount_target(item): item for item in old}
            by_target.update({_mount_target(item): item for item in value})
            merged[key] = list(by_target.values())
        elif key in _APPENDED:
            merged[key] = old + [item for item in value if item not in old]
        else:
            raise AssertionError(f"{where}: no merge rule here for {key!r}: add compose's")
    return merged


def compose_document(files: tuple[Path, ...], variables: Mapping[str, str]) -> dict[str, Any]:
    """`docker compose -f FILE -f FILE ...`'s view of the files: each one interpolated, then
    merged onto the ones before (services key by key; top-level volumes and secrets by name).
    Relative paths stay relative to the first file's folder, as in compose."""
    merged: dict[str, Any] = {}
    for path in files:
        document = _interpolated(yaml.safe_load(path.read_text()), variables)
        for key, value in document.items():
            if key.startswith("x-"):
                continue
            if key == "services":
                services = merged.setdefault("services", {})
                for name, service in value.items():
                    where = f"{path.name} services.{name}"
                    services[name] = _merge_service(services.get(name, {}), service, where)
            elif isinstance(value, dict):
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
    return merged


def env_dict(environment: Any) -> dict[str, str]:
    """A compose `environment` (mapping or KEY=VALUE list) as strings."""
    if environment is None:
        return {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {str(k): "" if v is None else str(v) for k, v in environment.items()}


# -- the secured variant ------------------------------------------------------------------------


def dev_secrets(folder: Path) -> dict[str, str]:
    """deploy/secrets/make-dev-secrets.sh run into `folder`: compose's variables for the
    secured files (the passwords of its secured.env, and SECRETS_DIR)."""
    subprocess.run(
        ["bash", str(MAKE_DEV_SECRETS), str(folder)], check=True, capture_output=True, timeout=60
    )
    variables = {"SECRETS_DIR": str(folder)}
    for line in (folder / "secured.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            variables[name] = value
    return variables


def kustomize_command() -> list[str] | None:
    """kustomize as `make kustomize` builds it into the virtualenv, else on the PATH, else
    kubectl's own (`kubectl kustomize`); None when there is none."""
    beside = Path(sys.executable).with_name("kustomize")
    if beside.exists():
        return [str(beside), "build"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def kustomize_build(folder: Path) -> list[dict[str, Any]]:
    """The manifests `kubectl apply -k FOLDER` would apply."""
    command = kustomize_command()
    if command is None:
        pytest.fail(
            "no kustomize: put kustomize or kubectl on the PATH (`make kustomize` builds it with "
            "Go where neither is)",
            pytrace=False,
        )
    done = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kustomize build {folder}: {done.stderr.strip()}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


# -- what the worker exports --------------------------------------------------------------------


def exported_metric_families() -> dict[str, str]:
    """{family name: type} of every metric the worker (streams/worker/metrics.py,
    streams/lifecycle/metrics.py) and the HTTP service (serve/metrics.py) declare."""
    registry = CollectorRegistry()
    WorkerMetrics(registry=registry, score_buckets=(1.0, 2.0, 3.0))
    LifecycleMetrics(registry=registry)
    ServeMetrics(registry=registry)
    return {family.name: family.type for family in registry.collect()}


def exported_series_names() -> set[str]:
    """Every series name the worker can expose: counters as _total (and _created), histograms
    as _bucket/_sum/_count (and _created), info as _info, gauges as they are. Labelled metrics
    with no child yet have no sample, so names come from the declared types, not the samples."""
    names: set[str] = set()
    for name, kind in exported_metric_families().items():
        if kind == "counter":
            names |= {f"{name}_total", f"{name}_created"}
        elif kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
        elif kind == "info":
            names.add(f"{name}_info")
        elif kind == "gauge":
            names.add(name)
        else:  # summary, stateset, ... : not used by the worker today
            raise AssertionError(f"{name}: unexpected metric type {kind}")
    return names


# -- rules --------------------------------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def recording_rule_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def alert_names() -> set[str]:
    return {rule["alert"] for rule in rules() if "alert" in rule}


# -- PromQL -------------------------------------------------------------------------------------

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords,
    label names (inside {} or by/on/... clauses), durations or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "''", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    # Grouping clauses go entirely, so `sum by (le) (x)` leaves `sum  (x)`: a call.
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b(?:\d+(?:ms|[smhdwy]))+\b", " ", text)  # durations (offset 5m)
    text = re.sub(r"\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        token = match.group(0)
        if token.lower() in _KEYWORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function call
        names.add(token)
    return names


# -- the dashboard ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    panel_type: str
    ref: str
    expr: str
    datasource_uid: str | None


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in _panels(dashboard()["panels"]) if p.get("type") != "row"]


def dashboard_queries() -> list[PanelQuery]:
    queries = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            ds = target.get("datasource") or panel.get("datasource") or {}
            queries.append(
                PanelQuery(
                    panel=panel["title"],
                    panel_type=panel["type"],
                    ref=target.get("refId", "?"),
                    expr=target["expr"],
                    datasource_uid=ds.get("uid") if isinstance(ds, dict) else ds,
                )
            )
    return queries


def template_queries() -> list[tuple[str, str]]:
    """(variable name, query) of the dashboard's query variables."""
    out = []
    for var in dashboard()["templating"]["list"]:
        if var.get("type") == "query":
            query = var["query"]
            out.append((var["name"], query["query"] if isinstance(query, dict) else query))
    return out


def label_values_metric(query: str) -> str:
    """The metric of a Grafana `label_values(metric{...}, label)` variable query."""
    match = re.fullmatch(
        r"\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*,.*\)\s*", query
    )
    assert match, f"not a label_values(metric, label) query: {query!r}"
    return match.group(1)


def substitute_grafana_variables(
    expr: str, *, rate_interval: str, job: str = JOB, instance: str = ".*"
) -> str:
    """The query Grafana would send: its built-in intervals and the dashboard's variables
    replaced by concrete values (instance = All -> `.*`)."""
    values = {
        "__rate_interval": rate_interval,
        "__interval": rate_interval,
        "__range": rate_interval,
        "job": job,
        "instance": instance,
    }
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value)
        expr = re.sub(r"\$" + re.escape(name) + r"\b", value, expr)
    assert "$" not in expr, f"unsubstituted variable left in {expr!r}"
    return expr


# -- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        lines.append(current)
        current = ""
    out = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        out.append((instruction.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, rest in dockerfile_instructions():
        if instruction == "ENV":
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {rest!r}: use KEY=value"
                env[key] = value
    return env


def dockerfile_exec_form(instruction: str) -> list[str]:
    found = [rest for name, rest in dockerfile_instructions() if name == instruction]
    assert len(found) == 1, f"expected one {instruction} in the Dockerfile, found {len(found)}"
    value = json.loads(found[0])
    assert isinstance(value, list), f"{instruction} must use the exec (JSON) form"
    return value
