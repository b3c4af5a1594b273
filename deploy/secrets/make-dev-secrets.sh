#!/usr/bin/env bash
# Development secrets for the secured compose stack (deploy/compose.secured.yaml): a private CA,
# certificates, and random passwords, written to a folder (default: this one, deploy/secrets/;
# git and the image build ignore everything here but this script). Production brings its own:
# the same file names from your CA and secret store, or the Kubernetes Secrets of
# deploy/k8s-secured/ (deploy/README.md, "Secured Kafka"). Needs openssl only.
#
#   deploy/secrets/make-dev-secrets.sh [FOLDER]
#   docker compose --env-file deploy/secrets/secured.env \
#       -f deploy/compose.yaml -f deploy/compose.secured.yaml up --build
#
# What it writes (keys are EC P-256 in unencrypted PKCS#8 PEM, the form both Kafka's PEM key
# stores and Python's ssl module read; certificates valid for 365 days):
#   ca.crt, ca.key            the CA that signs everything below (ca.key is not mounted anywhere)
#   kafka.pem                 the broker's key store (key, then certificate): CN=kafka, for the
#                             host names kafka, localhost and 127.0.0.1
#   kafka-admin.pem           key store of the admin client (CN=admin, a Kafka super user) that
#                             the `topics` service uses to create users, topics and ACLs
#   vaewatch.crt/.key         client certificates for mutual TLS (compose.secured-mtls.yaml):
#   producer.crt/.key         the worker, `vaewatch produce` and the console (`vaewatch serve`);
#   console.crt/.key          the broker maps CN=<name> to the principal User:<name>
#   worker-metrics.crt/.key   the worker's metrics endpoint (HTTPS): worker, localhost, 127.0.0.1
#   serve.crt/.key            `vaewatch serve` (HTTPS): serve, localhost, 127.0.0.1
#   metrics-password          the password Prometheus scrapes the workers with (basic auth)
#   secured.env               every password as the variables compose.secured.yaml reads
#                             (KAFKA_*_PASSWORD, METRICS_PASSWORD, SERVE_TOKEN)
# Files are world-readable: the containers run as other users (Kafka 1000, vaewatch 10001,
# Prometheus) and read them through bind mounts. Keep the folder on your machine only.
# An existing folder keeps its files: delete them to make new ones.
set -euo pipefail
out=${1:-$(cd "$(dirname "$0")" && pwd)}
mkdir -p "$out"
cd "$out"
if [ -e ca.crt ] || [ -e secured.env ]; then
    echo "make-dev-secrets: $out already holds secrets (ca.crt, secured.env): kept" >&2
    exit 0
fi
umask 022
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

subject() { printf '/O=vaewatch dev/CN=%s' "$1"; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days 365 -subj "$(subject 'vaewatch dev CA')" \
    -addext basicConstraints=critical,CA:TRUE,pathlen:0 \
    -addext keyUsage=critical,keyCertSign,cRLSign -out ca.crt

# issue NAME STEM [HOST...]: STEM.crt and STEM.key for CN=NAME, server and client use, with
# the hosts as subject alternative names.
issue() {
    local name=$1 stem=$2
    shift 2
    local san="" host
    for host in "$@"; do
        if [[ $host =~ ^[0-9.]+$ ]]; then san+="${san:+,}IP:$host"; else san+="${san:+,}DNS:$host"; fi
    done
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature"
        echo "extendedKeyUsage=serverAuth,clientAuth"
        [ -z "$san" ] || echo "subjectAltName=$san"
    } >"$work/$stem.ext"
    key "$stem.key"
    openssl req -new -key "$stem.key" -subj "$(subject "$name")" -out "$work/$stem.csr"
    openssl x509 -req -in "$work/$stem.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days 365 -sha256 -extfile "$work/$stem.ext" -out "$stem.crt" 2>/dev/null
}

issue kafka kafka kafka localhost 127.0.0.1
cat kafka.key kafka.crt >kafka.pem
issue admin kafka-admin
cat kafka-admin.key kafka-admin.crt >kafka-admin.pem
rm -f kafka.key kafka.crt kafka-admin.key kafka-admin.crt ca.srl
for client in vaewatch producer console; do issue "$client" "$client"; done
issue worker worker-metrics worker localhost 127.0.0.1
issue serve serve serve localhost 127.0.0.1
rm -f ca.srl
chmod 644 ./*.pem ./*.crt ./*.key
chmod 600 ca.key

password() { openssl rand -hex 20; }
metrics=$(password)
printf '%s' "$metrics" >metrics-password
{
    echo "# Passwords of the secured compose stack (deploy/compose.secured.yaml), made by"
    echo "# make-dev-secrets.sh. metrics-password holds METRICS_PASSWORD for Prometheus."
    echo "KAFKA_WORKER_PASSWORD=$(password)"
    echo "KAFKA_PRODUCER_PASSWORD=$(password)"
    echo "KAFKA_CONSOLE_PASSWORD=$(password)"
    echo "METRICS_PASSWORD=$metrics"
    echo "SERVE_TOKEN=$(password)"
} >secured.env
chmod 644 metrics-password secured.env
echo "make-dev-secrets: wrote a CA, certificates and passwords to $out" >&2
