"""The Kubernetes manifests take secret settings from a Secret that must exist: a missing Secret
stops the pod from starting instead of silently meaning "no password" (issue 9, finding 6)."""

from __future__ import annotations

from typing import Any

from tests.deploy.deploy_files import k8s_documents
from vaewatch.config import secret_keys


def _containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    spec = document.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) or spec.get("jobTemplate", {}).get(
        "spec", {}
    ).get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _secret_env() -> list[tuple[str, str, dict[str, Any]]]:
    secret_vars = {"VAEWATCH_" + key.replace(".", "__").upper() for key in secret_keys()}
    found = []
    for path, document in k8s_documents():
        for container in _containers(document):
            for item in container.get("env", []):
                if item["name"] in secret_vars:
                    found.append((path.name, item["name"], item))
    return found


def test_secret_settings_come_from_a_required_secret() -> None:
    found = _secret_env()
    assert found, "the worker Deployment reads VAEWATCH_STREAM__SASL_PASSWORD from a Secret"
    for file, name, item in found:
        assert "value" not in item, f"{file}: {name} is written into the manifest"
        reference = item.get("valueFrom", {}).get("secretKeyRef")
        assert reference, f"{file}: {name} must come from a Secret (secretKeyRef)"
        assert reference.get("optional", False) is False, (
            f"{file}: {name}'s Secret is optional, so a missing Secret means no password"
        )
