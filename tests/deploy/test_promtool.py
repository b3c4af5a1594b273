"""promtool (Debian's `prometheus` package) on deploy/prometheus/: the config, the rules, and the
rules' unit tests; plus checks that every alert has a unit test that fires and one that stays
silent, and that the Kubernetes PrometheusRule carries the same rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.deploy_files import (
    K8S,
    PROMETHEUS_CONFIG,
    PROMETHEUS_SECURED_CONFIG,
    RULES,
    RULES_TEST,
    alert_names,
    load_yaml,
    load_yaml_all,
)


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if path is None:
        pytest.fail("promtool not found: install Debian's `prometheus` package (.ci/run does)")
    return path


def _run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, cwd=RULES.parent
    )


@pytest.mark.parametrize(
    "config", [PROMETHEUS_CONFIG, PROMETHEUS_SECURED_CONFIG], ids=["plain", "secured"]
)
def test_promtool_check_config(promtool: str, config: Path) -> None:
    result = _run(promtool, "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    # The config must load the rules file (check config checks the rule files it names).
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_check_rules(promtool: str) -> None:
    result = _run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules(promtool: str) -> None:
    result = _run(promtool, "test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_test_rules_can_fail(promtool: str, tmp_path: Path) -> None:
    """The unit tests really constrain the rules: with one alert's threshold changed, they fail."""
    text = RULES.read_text()
    weakened = text.replace(
        "job:vaewatch_dead_letter_ratio:rate5m > 0.01",
        "job:vaewatch_dead_letter_ratio:rate5m > 0.5",
    )
    assert weakened != text, "the DLQ alert's expression changed: update this test"
    (tmp_path / "rules.yml").write_text(weakened)
    (tmp_path / "rules_test.yml").write_text(RULES_TEST.read_text())
    result = subprocess.run(
        [promtool, "test", "rules", "rules_test.yml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "VaewatchDeadLetterRateHigh" in result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = alert_names()
    required = {
        "VaewatchAnomalyRateHigh",
        "VaewatchWorkerDown",
        "VaewatchWorkerNotReady",
        "VaewatchConsumerLagGrowing",
        "VaewatchDeadLetterRateHigh",
        "VaewatchEndToEndLatencyHigh",
    }
    assert required <= alerts, f"missing alerts: {required - alerts}"
    assert alerts - fires == set(), f"alerts never expected to fire in a test: {alerts - fires}"
    assert alerts - silent == set(), f"alerts without a must-not-fire case: {alerts - silent}"
    assert (fires | silent) <= alerts, f"tests name unknown alerts: {(fires | silent) - alerts}"


def test_anomaly_rate_alert_compares_with_the_calibrated_target_fpr() -> None:
    rule = next(
        r
        for g in load_yaml(RULES)["groups"]
        for r in g["rules"]
        if r.get("alert") == "VaewatchAnomalyRateHigh"
    )
    assert "vaewatch_target_fpr" in rule["expr"]
    assert "anomaly_rate" in rule["expr"]


def test_k8s_prometheus_rule_carries_the_same_rules() -> None:
    docs = [
        d for d in load_yaml_all(K8S / "prometheusrule.yaml") if d.get("kind") == "PrometheusRule"
    ]
    assert len(docs) == 1
    assert docs[0]["spec"] == load_yaml(RULES), (
        "deploy/k8s/prometheusrule.yaml differs from deploy/prometheus/rules.yml: copy the groups"
    )
