#!/usr/bin/env bash
# The images `make deploy-test` runs beside vaewatch's, for hosts that cannot pull the official
# ones: Apache Kafka (Debian's JRE and the jars the project fetches) and Prometheus (Debian's
# package), both on deploy/base-image.sh's Debian base. Skipped when built before from the same
# files (the label io.vaewatch.context holds their hash); FORCE=1 builds them again. Prints the
# images' names as compose.yaml's variables:
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

# stale IMAGE FOLDER: true when IMAGE is missing or was built from other files than FOLDER's
# (the label io.vaewatch.context holds their hash), so that a changed script is built in.
context_hash() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16; }
stale() {
    [ -n "${FORCE:-}" ] && return 0
    built=$($ENGINE image inspect --format '{{ index .Labels "io.vaewatch.context" }}' "$1" 2>/dev/null) || return 0
    [ "$built" != "$(context_hash "$2")" ]
}

version=$($python -c "from streams.brokers.kafka_jars import kafka_version; print(kafka_version())")
kafka=localhost/vaewatch-kafka:$version
if stale "$kafka" "$here/kafka"; then
    libs=${KAFKA_LIBS:-$($python -c "from streams.brokers.kafka_jars import find_jars; print(find_jars().libs)")}
    context=$(mktemp -d "${TMPDIR:-/tmp}/vaewatch-kafka-image.XXXXXX")
    trap 'rm -rf "$context"' EXIT
    cp -r "$here/kafka/." "$context/"
    cp -r "$libs" "$context/libs"
    $ENGINE build --build-arg "BASE_IMAGE=$base" --label "io.vaewatch.context=$(context_hash "$here/kafka")" \
        -t "$kafka" "$context" >&2
fi

prometheus=localhost/vaewatch-prometheus:bookworm
if stale "$prometheus" "$here/prometheus"; then
    $ENGINE build --build-arg "BASE_IMAGE=$base" --label "io.vaewatch.context=$(context_hash "$here/prometheus")" \
        -t "$prometheus" "$here/prometheus" >&2
fi

echo "KAFKA_IMAGE=$kafka"
echo "PROMETHEUS_IMAGE=$prometheus"
