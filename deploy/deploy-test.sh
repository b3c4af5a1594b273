#!/usr/bin/env bash
# `make deploy-test`: deploy/compose.yaml's stack and deploy/k8s/'s worker, run in podman from
# the images `make image` and deploy/local-images/build.sh build, checked end to end
# (tests/deploy/test_compose_stack.py, test_kube_play.py; pytest -m containers).
#
# Everything a run starts (containers, pods, networks, volumes, secrets) carries its pytest
# process's id; pytest removes it on the way out, and so does this script after pytest has
# ended in any way (a failure, Ctrl-C, a SIGTERM or timeout's kill): a failed run leaves nothing
# that gets in the next one's way. Extra arguments go to pytest (e.g. -k kube).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
start=$(date +%s)

"$python" -m pytest -m containers tests/deploy -p no:cacheprovider -s "$@" &
pid=$!
cleanup() {
    kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    "$python" -c "from tests.deploy.containers import Podman
Podman.for_this_host().remove_run($pid)"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
wait "$pid"
status=$?
echo "deploy-test: pytest exited $status after $(($(date +%s) - start)) s"
exit "$status"
