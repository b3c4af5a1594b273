"""deploy/compose.yaml run by podman, service by service, as `docker compose up` runs it: the
file's images, entrypoints, commands, environments, volumes, published ports, health checks,
stop grace periods, init and restart policies, in the order its depends_on conditions give.

Why not a compose tool: Debian's podman-compose (1.0.3) starts services in order but does not
wait for depends_on conditions, and podman runs health checks from systemd timers, which hosts
without systemd (this kind of machine, CI) lack, so a compose tool waiting for `service_healthy`
would wait forever. Here each condition is waited for by running the health check itself.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.deploy.containers import Podman, wait_for
from tests.deploy.deploy_files import COMPOSE, compose_document


def _seconds(duration: str | int) -> int:
    """Compose durations as used in the file: '45s', '2m', '10s'."""
    match = re.fullmatch(r"(\d+)(s|m)?", str(duration))
    assert match, f"unsupported duration {duration!r}"
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def _health_flags(check: dict[str, Any]) -> list[str]:
    if check.get("disable"):
        return ["--no-healthcheck"]
    test = check["test"]
    if isinstance(test, str):
        command = test
    elif test[0] == "CMD":
        command = json.dumps(test[1:])
    elif test[0] == "CMD-SHELL":
        command = test[1]
    else:
        raise AssertionError(f"unsupported healthcheck test {test!r}")
    flags = ["--health-cmd", command]
    for key, flag in (
        ("interval", "--health-interval"),
        ("timeout", "--health-timeout"),
        ("start_period", "--health-start-period"),
    ):
        if key in check:
            flags += [flag, f"{_seconds(check[key])}s"]
    if "retries" in check:
        flags += ["--health-retries", str(check["retries"])]
    return flags


@dataclass
class ComposeStack:
    """The services of compose.yaml (merged with the override `files` after it, as `docker
    compose -f compose.yaml -f ...` merges them), each a container `<run prefix><service>` on
    one network where the service name resolves (as compose's default network does)."""

    podman: Podman
    variables: dict[str, str]
    # Per service, environment added to the file's (what a test changes, e.g. fewer epochs).
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)
    files: tuple[Path, ...] = (COMPOSE,)
    services: dict[str, Any] = field(init=False)
    started: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        assert self.files[0] == COMPOSE, "overrides go after compose.yaml"
        document = compose_document(self.files, self.variables)
        self.services = document["services"]
        self.volumes = set(document.get("volumes") or {})
        self.secrets = document.get("secrets") or {}

    @property
    def network(self) -> str:
        return f"{self.podman.prefix}net"

    def container(self, service: str) -> str:
        return f"{self.podman.prefix}{service}"

    def run_args(self, service: str) -> list[str]:
        """`podman run` arguments of one service, as compose would create its container."""
        spec = self.services[service]
        args = ["--detach", "--name", self.container(service), *self.podman.label]
        args += ["--network", self.network, "--network-alias", service]
        if "hostname" in spec:
            args += ["--hostname", spec["hostname"]]
        if spec.get("init"):
            args.append("--init")
        environment = dict(spec.get("environment") or {})
        environment.update(self.extra_env.get(service, {}))
        for name, value in environment.items():
            args += ["--env", f"{name}={'' if value is None else value}"]
        for volume in spec.get("volumes", []):
            source, target, *mode = volume.split(":")
            if source.startswith((".", "/")):
                source = str((COMPOSE.parent / source).resolve())
            else:
                assert source in self.volumes, f"{service}: volume {source} is not declared"
                source = f"{self.podman.prefix}{source}"
            args += ["--volume", ":".join([source, target, *mode])]
        # Compose's file secrets are read-only bind mounts at /run/secrets/<name>.
        for name in spec.get("secrets", []):
            assert isinstance(name, str), f"{service}: long-syntax secrets are not run here"
            source = (COMPOSE.parent / self.secrets[name]["file"]).resolve()
            args += ["--volume", f"{source}:/run/secrets/{name}:ro"]
        for port in spec.get("ports", []):
            args += ["--publish", str(port)]
        if "healthcheck" in spec:
            args += _health_flags(spec["healthcheck"])
        if "stop_grace_period" in spec:
            args += ["--stop-timeout", str(_seconds(spec["stop_grace_period"]))]
        restart = spec.get("restart", "no")
        if restart != "no":
            args += ["--restart", restart]
        entrypoint = spec.get("entrypoint")
        if entrypoint is not None:
            args += ["--entrypoint", json.dumps(entrypoint)]
        args.append(spec["image"])
        command = spec.get("command")
        if command is not None:
            args += shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
        return args

    def up(self, *services: str, timeout_s: float = 600.0) -> None:
        """Start the services and what they depend on, each once its dependencies meet their
        conditions (service_started, service_healthy, service_completed_successfully)."""
        if not self.started:
            self.podman.run("network", "create", *self.podman.label, self.network)
            for volume in sorted(self.volumes):
                self.podman.run("volume", "create", *self.podman.label, self.podman.prefix + volume)
        for service in services:
            self._up(service, timeout_s)

    def _up(self, service: str, timeout_s: float) -> None:
        if service in self.started:
            return
        depends = self.services[service].get("depends_on") or {}
        if isinstance(depends, list):
            depends = {name: {"condition": "service_started"} for name in depends}
        for name, how in depends.items():
            self._up(name, timeout_s)
            self.wait_for_condition(name, how.get("condition", "service_started"), timeout_s)
        self.podman.run("run", *self.run_args(service), timeout_s=300)
        self.started.append(service)

    def wait_for_condition(self, service: str, condition: str, timeout_s: float) -> None:
        name = self.container(service)
        if condition == "service_healthy":
            self.podman.wait_healthy(name, timeout_s=timeout_s)
        elif condition == "service_completed_successfully":
            code = self.podman.wait_exit(name, timeout_s=timeout_s)
            assert code == 0, f"{service} exited {code}:\n{self.podman.logs(name)[-3000:]}"
        else:
            assert condition == "service_started", condition
            wait_for(
                lambda: self.podman.state(name)["Status"] != "created",
                timeout_s=60,
                what=f"{service} started",
            )
