#!/usr/bin/env bash
# `make image`: the CPU image of deploy/Dockerfile, with podman or docker (deploy/engine.sh).
#
#   deploy/build-image.sh [BUILD ARGUMENTS...]       e.g. --no-cache
#
# IMAGE names it (vaewatch:cpu). Unless given, the base (CPU_IMAGE) and the torch source
# (TORCH_INDEX_URL) are chosen for the host:
#   - python:3.12-slim-bookworm when the engine has it or can pull it; otherwise a Debian base
#     made from Debian's packages by deploy/base-image.sh (localhost/debian-base:bookworm);
#   - PyTorch's CPU wheel index when it answers; otherwise PyPI, whose torch is a CUDA build
#     (the image is then several GB larger, and scores on the CPU all the same).
# A CA bundle named by PIP_CERT, SSL_CERT_FILE or REQUESTS_CA_BUNDLE (a TLS-intercepting proxy's)
# is lent to pip during the build as the secret `pip-cert`; it is not stored in the image.
# Prints the build time and the image's size.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=deploy/engine.sh
. deploy/engine.sh

image=${IMAGE:-vaewatch:cpu}
slim=python:3.12-slim-bookworm
cpu_index=https://download.pytorch.org/whl/cpu
start=$(date +%s)

if [ -z "${CPU_IMAGE:-}" ]; then
    if $ENGINE image inspect "$slim" >/dev/null 2>&1 \
        || timeout 600 "$ENGINE" pull -q "$slim" >/dev/null 2>&1; then
        CPU_IMAGE=$slim
    else
        echo "$slim cannot be pulled: making a Debian base with debootstrap"
        deploy/base-image.sh
        CPU_IMAGE=localhost/debian-base:bookworm
    fi
fi
if [ -z "${TORCH_INDEX_URL:-}" ]; then
    if python3 -c "import urllib.request as u; u.urlopen('$cpu_index/torch/', timeout=20)" \
        >/dev/null 2>&1; then
        TORCH_INDEX_URL=$cpu_index
    else
        echo "$cpu_index does not answer: torch from PyPI (a CUDA build, several GB)"
        TORCH_INDEX_URL=https://pypi.org/simple
    fi
fi

flags=(--build-arg VARIANT=cpu --build-arg "CPU_IMAGE=$CPU_IMAGE"
    --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
if [ "$ENGINE" = podman ]; then
    # docker format: the OCI format has no HEALTHCHECK, podman would drop it. Docker's BuildKit
    # finds deploy/Dockerfile.dockerignore by itself; podman 4 is told.
    flags+=(--format docker --ignorefile deploy/Dockerfile.dockerignore)
fi
for cert in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}"; do
    if [ -n "$cert" ] && [ -f "$cert" ]; then
        flags+=(--secret "id=pip-cert,src=$cert")
        break
    fi
done

echo "building $image with $ENGINE: base $CPU_IMAGE, torch from $TORCH_INDEX_URL"
$ENGINE build -f deploy/Dockerfile "${flags[@]}" "$@" -t "$image" .
size=$($ENGINE image inspect --format '{{.Size}}' "$image")
echo "$image: $((size / 1000000)) MB, built in $(($(date +%s) - start)) s"
