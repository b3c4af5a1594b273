"""podman for the container tests (`make deploy-test`): its environment (deploy/engine.sh),
commands bounded in time whose failures carry podman's own words, health checks run on demand,
and the removal of everything a test run made.

Every object a run makes (containers, pods, networks, volumes, secrets) carries the label
LABEL=<the run's pid> or a name starting with `vwtest-<pid>-`, so that the run removes exactly its
own objects on every way out, and a later run removes those of runs that died without doing so
(SIGKILL, a machine stop) before they can get in its way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.deploy.deploy_files import DEPLOY

LABEL = "io.vaewatch.deploy-test"
_PREFIX = re.compile(r"^vwtest-(\d+)-")


class PodmanError(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Podman:
    """podman with the host's settings. `run_id` is this run's pid: the label and name prefix
    of everything it makes."""

    env: dict[str, str]
    run_id: int = field(default_factory=os.getpid)

    @classmethod
    def for_this_host(cls) -> Podman:
        out = subprocess.run(
            ["bash", str(DEPLOY / "engine.sh")],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        settings = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        engine = settings.pop("ENGINE")
        if engine != "podman":
            raise PodmanError(
                f"the container tests drive podman (kube play); the engine is {engine}"
            )
        return cls(env={**os.environ, **settings})

    @property
    def prefix(self) -> str:
        return f"vwtest-{self.run_id}-"

    @property
    def label(self) -> list[str]:
        return ["--label", f"{LABEL}={self.run_id}"]

    def run(
        self, *args: str, timeout_s: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = ["podman", *args]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, env=self.env, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            raise PodmanError(f"`{' '.join(command)[:300]}` took over {timeout_s:.0f} s") from None
        if check and done.returncode != 0:
            raise PodmanError(
                f"`{' '.join(command)[:300]}` exited {done.returncode}: {_tail(done.stderr)}"
            )
        return done

    def out(self, *args: str, timeout_s: float = 120.0) -> str:
        return self.run(*args, timeout_s=timeout_s).stdout.strip()

    def inspect(self, name: str, template: str) -> str:
        return self.out("inspect", "--format", template, name)

    def state(self, name: str) -> dict[str, Any]:
        return json.loads(self.inspect(name, "{{json .State}}"))

    def logs(self, name: str) -> str:
        done = self.run("logs", name, check=False)
        return done.stdout + done.stderr

    def health_check(self, name: str) -> bool:
        """One run of the container's health check, as podman's systemd timer would run it
        (hosts without systemd, like this one and CI, have no timer: nothing runs the checks
        unless asked). True when it passed."""
        return self.run("healthcheck", "run", name, check=False, timeout_s=60).returncode == 0

    def wait_healthy(self, name: str, *, timeout_s: float, interval_s: float = 3.0) -> None:
        def healthy() -> bool:
            if not self.state(name)["Running"]:
                raise PodmanError(
                    f"{name} stopped before it was healthy:\n{_tail(self.logs(name))}"
                )
            return self.health_check(name)

        wait_for(
            healthy,
            timeout_s=timeout_s,
            interval_s=interval_s,
            what=f"{name} healthy",
            detail=lambda: _tail(self.logs(name)),
        )

    def wait_exit(self, name: str, *, timeout_s: float) -> int:
        """The container's exit code once it has exited."""
        wait_for(
            lambda: self.state(name)["Status"] in ("exited", "stopped"),
            timeout_s=timeout_s,
            what=f"{name} to exit",
            detail=lambda: _tail(self.logs(name)),
        )
        return int(self.state(name)["ExitCode"])

    def ip_address(self, name: str) -> str:
        networks = json.loads(self.inspect(name, "{{json .NetworkSettings.Networks}}"))
        (address,) = {n["IPAddress"] for n in networks.values() if n.get("IPAddress")}
        return address

    # -- removal --------------------------------------------------------------------------------

    def remove_run(self, run_id: int | None = None) -> None:
        """Remove every object of run `run_id` (this one by default): containers (with their
        anonymous volumes), pods, volumes, networks, secrets. Never raises: it runs on the way out
        of failed runs too."""
        run_id = self.run_id if run_id is None else run_id
        label = f"label={LABEL}={run_id}"
        prefix = f"vwtest-{run_id}-"
        for pod in self._names("pod", "ps", label=label, prefix=prefix):
            for container in self._list("ps", "-a", "--filter", f"pod={pod}"):
                self.run("rm", "-f", "-v", "-t", "0", container, check=False)
            self.run("pod", "rm", "-f", "-t", "0", pod, check=False)
        for container in self._names("ps", "-a", label=label, prefix=prefix):
            self.run("rm", "-f", "-v", "-t", "0", container, check=False)
        for volume in self._names("volume", "ls", label=label, prefix=prefix):
            self.run("volume", "rm", "-f", volume, check=False)
        for network in self._names("network", "ls", label=label, prefix=prefix):
            self.run("network", "rm", "-f", network, check=False)
        for secret in self._names("secret", "ls", prefix=prefix):
            self.run("secret", "rm", secret, check=False)

    def remove_stale_runs(self) -> None:
        """Remove what earlier runs left behind when they died (their pid is gone)."""
        runs: set[int] = set()
        for kind in (("ps", "-a"), ("pod", "ps"), ("volume", "ls"), ("network", "ls")):
            for line in self._list(*kind, "--filter", f"label={LABEL}", template="{{.Labels}}"):
                runs |= {int(m) for m in re.findall(rf"{re.escape(LABEL)}:(\d+)", line)}
        for kind in (
            ("ps", "-a"),
            ("pod", "ps"),
            ("volume", "ls"),
            ("network", "ls"),
            ("secret", "ls"),
        ):
            for name in self._list(*kind):
                match = _PREFIX.match(name)
                if match:
                    runs.add(int(match.group(1)))
        for run_id in runs - {self.run_id}:
            if not _alive(run_id):
                self.remove_run(run_id)

    def _names(self, *kind: str, label: str | None = None, prefix: str) -> set[str]:
        names = set(self._list(*kind, "--filter", label)) if label else set()
        return names | {name for name in self._list(*kind) if name.startswith(prefix)}

    def _list(self, *args: str, template: str = "{{.Name}}") -> list[str]:
        if args[:1] == ("ps",):
            template = template.replace("{{.Name}}", "{{.Names}}")
        done = self.run(*args, "--format", template, check=False, timeout_s=60)
        return [line for line in done.stdout.splitlines() if line.strip()]


def wait_for(
    condition: Callable[[], Any],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 1.0,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll `condition` until it returns something true; its value. A timeout names `what`,
    with `detail()` (a log tail) to say why."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            more = f"\n{detail()}" if detail else ""
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}{more}")
        time.sleep(interval_s)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@contextlib.contextmanager
def run_scope(podman: Podman) -> Iterator[Podman]:
    """Removes this run's objects on the way out, and earlier dead runs' on the way in."""
    podman.remove_stale_runs()
    try:
        yield podman
    finally:
        podman.remove_run()


VAEWATCH_IMAGE = "localhost/vaewatch:cpu"


def stack_images(podman: Podman) -> dict[str, str]:
    """compose.yaml's image variables on this host: the vaewatch image that `make image`
    built (it must be there: building it takes minutes), and the Kafka and Prometheus images of
    deploy/local-images/build.sh (built now if missing, in about a minute)."""
    if podman.run("image", "exists", VAEWATCH_IMAGE, check=False).returncode != 0:
        raise PodmanError(f"no {VAEWATCH_IMAGE}: `make image` builds it (`make deploy-test` too)")
    done = subprocess.run(
        ["bash", str(DEPLOY / "local-images" / "build.sh")],
        capture_output=True,
        text=True,
        env={**podman.env, "PYTHON": sys.executable},
        timeout=900,
    )
    if done.returncode != 0:
        raise PodmanError(f"deploy/local-images/build.sh failed:\n{_tail(done.stderr)}")
    images = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return {**images, "IMAGE_VARIANT": "cpu"}
