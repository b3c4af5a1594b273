#!/usr/bin/env bash
# The images `make deploy-test` runs beside vaewatch's, for hosts that cannot pull the official
# ones: Apache Kafka (Debian's JRE and the jars the project fetches) and Prometheus (Debian's
# package), both on deploy/base-image.sh's Debian base. Skipped when built before; FORCE=1
# builds them again. Prints the images' names as compose.yaml's variables:
#   KAFKA_IMAGE=localhost/vaewatch-kafka:4.4.0
#   PROMETHEUS_IMAGE=localhost/vaewatch-prometheus:bookworm
# KAFKA_LIBS is the folder of Kafka's jars (default: the project's cache, fetched if missing,
# by PYTHON, the project's virtualenv).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
# shellcheck source=deploy/engine.sh
. deploy/engine.sh
python=${PYTHON:-.venv/bin/python}
base=localhost/debian-base:bookworm

deploy/base-image.sh "$base" >&2

version=$($python -c "from streams.brokers.kafka_jars import kafka_version; print(kafka_version())")
kafka=localhost/vaewatch-kafka:$version
if [ -n "${FORCE:-}" ] || ! $ENGINE image inspect "$kafka" >/dev/null 2>&1; then
    libs=${KAFKA_LIBS:-$($python -c "from streams.brokers.kafka_jars import find_jars; print(find_jars().libs)")}
    context=$(mktemp -d "${TMPDIR:-/tmp}/vaewatch-kafka-image.XXXXXX")
    trap 'rm -rf "$context"' EXIT
    cp -r "$here/kafka/." "$context/"
    cp -r "$libs" "$context/libs"
    $ENGINE build --build-arg "BASE_IMAGE=$base" -t "$kafka" "$context" >&2
fi

prometheus=localhost/vaewatch-prometheus:bookworm
if [ -n "${FORCE:-}" ] || ! $ENGINE image inspect "$prometheus" >/dev/null 2>&1; then
    $ENGINE build --build-arg "BASE_IMAGE=$base" -t "$prometheus" "$here/prometheus" >&2
fi

echo "KAFKA_IMAGE=$kafka"
echo "PROMETHEUS_IMAGE=$prometheus"
