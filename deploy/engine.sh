#!/usr/bin/env bash
# The container engine of deploy/'s scripts, `make image` and `make deploy-test`.
#
# Sourced, it sets ENGINE (CONTAINER_ENGINE if set, else podman when installed, else docker).
# For root's podman on a host where root may not raise its resource limits (inside a container
# or a sandboxed VM), it also exports CONTAINERS_CONF, pointing at a containers.conf written
# under build/: podman's defaults (1048576 open files, 4194304 processes) fail there with
# "error setting rlimit ...: operation not permitted", so containers get the host's own limits,
# and the runc runtime (crun fails on such hosts). `podman kube play` has no flags for either,
# which is why it is a configuration file rather than --ulimit and --runtime arguments.
#
# Run as a script, it prints ENGINE=... and, when set, CONTAINERS_CONF=... (one a line).

_deploy_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [ -n "${CONTAINER_ENGINE:-}" ]; then
    ENGINE=$CONTAINER_ENGINE
elif command -v podman >/dev/null 2>&1; then
    ENGINE=podman
else
    ENGINE=docker
fi

_limit() {  # ulimit's hard limit -$1, at most $2
    local value
    value=$(ulimit "-H$1")
    if [ "$value" = unlimited ] || [ "$value" -gt "$2" ]; then echo "$2"; else echo "$value"; fi
}

if [ "$ENGINE" = podman ] && [ -z "${CONTAINERS_CONF:-}" ] && [ "$(id -u)" = 0 ] \
    && ! (ulimit -n 1048576 && ulimit -u 4194304) 2>/dev/null; then
    mkdir -p "$_deploy_dir/../build"
    CONTAINERS_CONF="$(cd "$_deploy_dir/.." && pwd)/build/containers.conf"
    {
        # podman's container monitor (conmon) itself runs with at most 32768 processes.
        nofile=$(_limit n 1048576) nproc=$(_limit u 32768)
        echo "# Written by deploy/engine.sh: this host's own limits (root may not raise them)."
        echo "[containers]"
        echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
        if command -v runc >/dev/null 2>&1; then
            echo "[engine]"
            echo "runtime = \"runc\""
        fi
    } >"$CONTAINERS_CONF"
    export CONTAINERS_CONF
fi

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "ENGINE=$ENGINE"
    [ -z "${CONTAINERS_CONF:-}" ] || echo "CONTAINERS_CONF=$CONTAINERS_CONF"
fi
