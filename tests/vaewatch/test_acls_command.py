"""`vaewatch acls`: the minimal ACL set of each client, derived from the settings. The live
tests (tests/streams/test_secured_clients.py) grant exactly these sets on a broker with an
authorizer and run each client through it; here, what the command prints for which settings."""

from __future__ import annotations

import re

import pytest
import yaml

from vaewatch.cli import main


def _acls(capsys, *args: str) -> list[str]:
    assert main(["--log-level", "WARNING", *args]) == 0
    return capsys.readouterr().out.splitlines()


def _rules(lines: list[str]) -> set[tuple[str, ...]]:
    """(principal, operation, resource option, name[, 'prefixed']) of each kafka-acls line."""
    rules = set()
    for line in lines:
        if line.startswith("#"):
            continue
        match = re.match(
            r"kafka-acls\.sh --bootstrap-server \S+ --command-config admin\.properties --add "
            r"--allow-principal '([^']+)' --operation (\w+) (--[\w-]+) (\S+)"
            r"( --resource-pattern-type prefixed)?   # .+$",
            line,
        )
        assert match, line
        rules.add(tuple(g.strip().split()[-1] for g in match.groups() if g))
    return rules


SASL = ["--set", "stream.security_protocol=SASL_SSL", "--set", "stream.sasl_username=w"]


def test_the_worker_at_least_once_reads_its_input_and_group_and_writes_its_outputs(
    capsys,
) -> None:
    lines = _acls(capsys, *SASL, "acls")
    assert lines[0].startswith("# The ACLs User:w needs as vaewatch worker (at-least-once)")
    assert _rules(lines) == {
        ("User:w", "Read", "--topic", "images"),
        ("User:w", "Read", "--group", "vaewatch"),
        ("User:w", "Write", "--topic", "alerts"),
        ("User:w", "Write", "--topic", "images.dlq"),
    }


def test_exactly_once_adds_its_transactional_id_and_optional_topics_their_writes(capsys) -> None:
    settings = [
        "stream.processing_guarantee=exactly_once",
        "stream.scores_topic=scores",
        "lifecycle.shadow_topic=shadow",
        "stream.group_id=g",
    ]
    rules = _rules(_acls(capsys, *SASL, *(a for s in settings for a in ("--set", s)), "acls"))
    assert ("User:w", "Write", "--transactional-id", "g-", "prefixed") in rules
    assert {("User:w", "Write", "--topic", t) for t in ("scores", "shadow")} <= rules
    fixed = ["--set", "stream.processing_guarantee=exactly_once"]
    fixed += ["--set", "stream.transactional_id=worker-1"]
    rules = _rules(_acls(capsys, *SASL, *fixed, "acls"))
    assert ("User:w", "Write", "--transactional-id", "worker-1") in rules


def test_one_topic_for_both_outputs_is_one_rule(capsys) -> None:
    same = ["--set", "stream.scores_topic=alerts"]
    rules = _rules(_acls(capsys, *SASL, *same, "acls"))
    assert len([r for r in rules if r[3] == "alerts"]) == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--client", "produce"], {("User:w", "Write", "--topic", "images")}),
        (
            ["--client", "produce", "--topic", "x", "--create-topics"],
            {("User:w", "Write", "--topic", "x"), ("User:w", "Create", "--topic", "x")},
        ),
        (
            ["--client", "serve"],
            {("User:w", "Read", "--topic", "alerts"), ("User:w", "Read", "--topic", "images")},
        ),
        (["--client", "recalibrate", "--topic", "r"], {("User:w", "Read", "--topic", "r")}),
    ],
    ids=["produce", "produce creating", "serve", "recalibrate"],
)
def test_the_other_clients(capsys, args, expected) -> None:
    assert _rules(_acls(capsys, *SASL, "acls", *args)) == expected


def test_a_principal_from_the_command_line_and_strimzi_output(capsys) -> None:
    lines = _acls(capsys, "acls", "--principal", "CN=worker,O=acme", "--format", "strimzi")
    assert "User:CN=worker,O=acme" in lines[0]
    spec = yaml.safe_load("\n".join(lines[1:]))["authorization"]
    assert spec["type"] == "simple"
    assert {
        (a["resource"]["type"], a["resource"]["name"], *a["operations"]) for a in spec["acls"]
    } == {
        ("topic", "images", "Read"),
        ("group", "vaewatch", "Read"),
        ("topic", "alerts", "Write"),
        ("topic", "images.dlq", "Write"),
    }


def test_without_a_principal_it_says_how_to_name_one(capsys) -> None:
    assert main(["acls"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("vaewatch: error: name the principal with --principal (User:NAME)")
