"""The secured variant of deploy/ (docs/secured-kafka.md, deploy/README.md): the compose overrides
compose.secured.yaml and compose.secured-mtls.yaml, the kustomize overlays k8s-secured/ and
k8s-secured-mtls/ (rendered by kustomize itself), and prometheus.secured.yml.

Each variant is read as the tools read it (compose's interpolation and merge of the files, the
rendered manifests) and checked against vaewatch: every VAEWATCH_* variable is a settings key
with a valid value; every endpoint is on the process's port, path and scheme (HTTPS where it has
a certificate); every certificate, key and CA a setting names is a file that is mounted there,
from a compose secret or a Kubernetes Secret key that deploy/README.md lists, and the files
make-dev-secrets.sh writes load as vaewatch loads them; the broker listener each client uses
speaks its protocol; the ACLs the compose stack grants are what `vaewatch acls` prints; KEDA,
the ServiceMonitors and the topics Job agree with the ConfigMap; and no secret is written in a
file: passwords only from the environment or Secrets.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from cryptography import x509

from streams.acls import client_acls
from streams.tls import check_client_tls_files, server_tls_context
from tests.deploy.deploy_files import (
    COMPOSE,
    COMPOSE_SECURED,
    COMPOSE_SECURED_MTLS,
    DEPLOY,
    K8S_SECURED,
    K8S_SECURED_MTLS,
    PROMETHEUS_CONFIG,
    PROMETHEUS_SECURED_CONFIG,
    compose_document,
    dev_secrets,
    dockerfile_env,
    env_dict,
    k8s_documents,
    kustomize_build,
    load_yaml,
)
from tests.deploy.test_endpoints import (
    compose_endpoints,
    endpoint_problems,
    k8s_endpoints,
    prometheus_endpoints,
)
from tests.deploy.test_static import (
    IMAGE_ENTRYPOINT,
    _container_env,
    _image_settings,
    _parse_vaewatch,
    _service_command,
    _settings,
    _topic_partitions,
    check_vaewatch_env,
    compose,
)
from vaewatch.config import Settings, secret_keys

SASL = (COMPOSE, COMPOSE_SECURED)
MTLS = (COMPOSE, COMPOSE_SECURED, COMPOSE_SECURED_MTLS)
VARIANTS = {"sasl": SASL, "mtls": MTLS}
OVERLAYS = {"sasl": K8S_SECURED, "mtls": K8S_SECURED_MTLS}
CLIENTS = ("worker", "producer", "serve")  # the compose services that are Kafka clients
# Settings that name a file (a certificate, a key, a CA), by the command that reads them (the
# worker and serve share the ConfigMap: serve never reads metrics.*, the worker never serve.*).
_KAFKA_FILES = ("stream.ssl_cafile", "stream.ssl_certfile", "stream.ssl_keyfile")
_METRICS_FILES = ("metrics.tls_cert_file", "metrics.tls_key_file", "metrics.tls_client_ca_file")
_SERVE_FILES = ("serve.ssl_certfile", "serve.ssl_keyfile", "serve.ssl_ca_certs")
FILE_SETTINGS = {
    "worker": (*_KAFKA_FILES, *_METRICS_FILES),
    "serve": (*_KAFKA_FILES, *_SERVE_FILES),
    "produce": _KAFKA_FILES,
}
# What the secured variant may change in the ConfigMap's config; the rest is the base's.
SECURITY_KEYS = {
    "stream": {"bootstrap_servers", "security_protocol", "sasl_mechanism", "sasl_username"}
    | {"ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"},
    "metrics": {"tls_cert_file", "tls_key_file", "tls_client_ca_file", "basic_auth_username"},
}
# KEDA's names of the SASL mechanisms (its Kafka scaler's `sasl`).
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
SECRET_VARIABLES = {"VAEWATCH_" + key.replace(".", "__").upper() for key in secret_keys()}


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The variables of a secured compose run: make-dev-secrets.sh's passwords and folder."""
    return dev_secrets(tmp_path_factory.mktemp("dev-secrets"))


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize_build(folder) for name, folder in OVERLAYS.items()}


def _setting(settings: Settings, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(settings, section), key)


# -- compose ------------------------------------------------------------------------------------


def _mounted_file(document: dict[str, Any], service: str, path: str) -> Path:
    """The host file compose mounts at `path` in `service`: a secret (/run/secrets/NAME) or a
    bind mount."""
    spec = document["services"][service]
    if path.startswith("/run/secrets/"):
        name = path.removeprefix("/run/secrets/")
        assert name in spec.get("secrets", []), f"{service}: {path}, but no secret {name!r}"
        return (COMPOSE.parent / document["secrets"][name]["file"]).resolve()
    for volume in spec.get("volumes", []):
        source, target, *_ = volume.split(":")
        if target == path:
            return (COMPOSE.parent / source).resolve()
    raise AssertionError(f"{service}: nothing is mounted at {path}")


def _listeners(kafka_env: dict[str, str]) -> dict[str, str]:
    """{advertised host:port: its security protocol} of the broker."""
    protocols = dict(
        item.split(":") for item in kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    found = {}
    for listener in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(","):
        name, _, address = listener.partition("://")
        found[address] = protocols[name]
    return found


def _client_settings(document: dict[str, Any]) -> dict[str, Settings]:
    return {
        name: _image_settings(env_dict(document["services"][name]["environment"]))
        for name in CLIENTS
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_secured_compose_clients_agree_with_the_broker_and_their_files(
    variant: str, secrets: dict[str, str]
) -> None:
    document = compose_document(VARIANTS[variant], secrets)
    kafka_env = env_dict(document["services"]["kafka"]["environment"])
    listeners = _listeners(kafka_env)
    for name, settings in _client_settings(document).items():
        env = env_dict(document["services"][name]["environment"])
        check_vaewatch_env(f"{variant} {name}", dict(env))
        stream = settings.stream
        assert stream.bootstrap_servers in listeners, (name, stream.bootstrap_servers)
        assert listeners[stream.bootstrap_servers] == stream.security_protocol, (
            f"{name}: {stream.security_protocol} to a "
            f"{listeners[stream.bootstrap_servers]} listener"
        )
        assert stream.security_protocol in ("SASL_SSL", "SSL")
        if stream.security_protocol == "SASL_SSL":
            assert stream.sasl_mechanism in kafka_env["KAFKA_SASL_ENABLED_MECHANISMS"].split(",")
        else:
            assert stream.ssl_certfile and stream.ssl_keyfile, f"{name}: mutual TLS, no cert"
        files = {}
        process = _parse_vaewatch(
            IMAGE_ENTRYPOINT[1:] + _service_command(document["services"][name])
        ).command
        for dotted in FILE_SETTINGS[process]:
            value = _setting(settings, dotted)
            if value:
                files[dotted] = _mounted_file(document, name, value)
                assert files[dotted].is_file(), f"{name}: {dotted} {value}: no such file"
        # The files load as vaewatch loads them, before anything connects.
        check_client_tls_files(
            prefix="stream.",
            cafile=str(files["stream.ssl_cafile"]),
            certfile=str(files.get("stream.ssl_certfile") or "") or None,
            keyfile=str(files.get("stream.ssl_keyfile") or "") or None,
            password=None,
        )
        for setting, key in (
            ("metrics.tls_cert_file", "metrics.tls_key_file"),
            ("serve.ssl_certfile", "serve.ssl_keyfile"),
        ):
            if setting in files:
                server_tls_context(
                    setting=setting, certfile=str(files[setting]), keyfile=str(files[key])
                )
    # The broker's own files, and the hosts its certificate must name.
    for path in ("/etc/kafka/secrets/kafka.pem", "/etc/kafka/secrets/ca.crt"):
        assert _mounted_file(document, "kafka", path).is_file()
    names = _certificate_names(_mounted_file(document, "kafka", "/etc/kafka/secrets/kafka.pem"))
    for address in listeners:
        assert address.rsplit(":", 1)[0] in names, f"kafka's certificate does not name {address}"


def _certificate_names(path: Path) -> set[str]:
    pem = re.search(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", path.read_bytes(),
                    re.S)  # fmt: skip
    certificate = x509.load_pem_x509_certificate(pem.group(0))
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n) for n in names.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in names.get_values_for_type(x509.IPAddress)
    }


def _common_name(path: Path) -> str:
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    return certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value


def test_the_compose_files_hold_no_secret(secrets: dict[str, str]) -> None:
    """Every secret setting and password comes from a required variable (`${VAR:?...}`),
    never written in the file; compose stops naming a missing one."""
    for path in (COMPOSE_SECURED, COMPOSE_SECURED_MTLS):
        assert secret_literals(path.read_text()) == [], path.name
    document = yaml.safe_load(COMPOSE_SECURED.read_text())
    required = set()
    for name, service in document["services"].items():
        for key, value in env_dict(service.get("environment")).items():
            if key in SECRET_VARIABLES or key.endswith("_PASSWORD"):
                match = re.fullmatch(r"\$\{([A-Z_]+):\?[^}]+\}", value)
                assert match, f"{name}: {key} must be ${{VARIABLE:?message}}, not {value!r}"
                required.add(match.group(1))
    assert required <= secrets.keys(), (
        f"make-dev-secrets.sh does not set {required - secrets.keys()}"
    )
    for missing in sorted(required):
        variables = {k: v for k, v in secrets.items() if k != missing}
        with pytest.raises(AssertionError, match=missing):
            compose_document(SASL, variables)


def secret_literals(text: str) -> list[str]:
    """Lines of a deploy file that carry a secret: a key or certificate (PEM), a Secret's data,
    or a password, token or secret given as a value instead of taken from a variable ($...) or
    a file (/..., *_file)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        code = line.strip()
        if code.startswith("#"):
            continue
        if "-----BEGIN" in code or re.match(r"(data|stringData|literals):", code):
            found.append(f"{number}: {code}")
            continue
        for match in _SECRET_ASSIGNMENT.finditer(code.replace('"', "").replace("'", "")):
            name, value = match.group(1), match.group(2)
            if name.lower().endswith("file") or name in _SECRET_REFERENCES:
                continue
            if "$" in value or value.startswith(("/", "./", "-./")):
                continue
            found.append(f"{number}: {code}")
    return found


# NAME: VALUE or NAME=VALUE where NAME speaks of a password, token or secret, VALUE not empty.
_SECRET_ASSIGNMENT = re.compile(
    r"\b([\w.]*(?:password|passwd|token|secret)[\w.]*)\s*[:=]\s*([^\s,;\]}]+)", re.IGNORECASE
)
# Keys that name a Secret rather than hold one.
_SECRET_REFERENCES = {"secretName", "secretKeyRef", "secretTargetRef", "secrets"}


@pytest.mark.parametrize(
    ("path", "old", "new"),
    [
        (COMPOSE_SECURED, "${METRICS_PASSWORD:?missing, see deploy/secrets/make-dev-secrets.sh}",
         "hunter2-2024"),
        (COMPOSE_SECURED, "[password=$$KAFKA_WORKER_PASSWORD]", "[password=hunter2]"),
        (PROMETHEUS_SECURED_CONFIG, "password_file: /run/secrets/metrics-password",
         "password: hunter2"),
        (K8S_SECURED / "topics-job-patch.yaml", 'password="$KAFKA_ADMIN_PASSWORD"',
         'password="hunter2"'),
    ],
)  # fmt: skip
def test_the_literal_check_catches_a_written_password(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    assert secret_literals(text.replace(old, new, 1)), f"{path.name}: {new!r} not caught"


def test_no_deploy_file_of_the_secured_variant_holds_a_secret() -> None:
    files = [PROMETHEUS_SECURED_CONFIG, DEPLOY / "kafka" / "admin.properties", COMPOSE]
    files += sorted(K8S_SECURED.glob("*.yaml")) + sorted(K8S_SECURED_MTLS.glob("*.yaml"))
    for path in files:
        assert secret_literals(path.read_text()) == [], path


def test_secured_compose_grants_what_vaewatch_acls_prints(secrets: dict[str, str]) -> None:
    """The `topics` service creates the base file's topics, a SCRAM user per client and each
    client's ACLs: exactly the sets `vaewatch acls` derives from their settings, and with
    mutual TLS the client certificates map to the same principals."""
    document = compose_document(SASL, secrets)
    script = _service_command(document["services"]["topics"])[0]
    base_script = _service_command(compose()["services"]["topics"])[0]
    created = _topic_partitions(script.replace("$admin", "--bootstrap-server kafka:19094"),
                                "kafka:19094")  # fmt: skip
    assert created == _topic_partitions(base_script, "kafka:19092"), "other topics than compose's"
    settings = _client_settings(document)
    users = set(re.findall(r"--entity-type users --entity-name (\S+) --add-config", script))
    assert users == {s.stream.sasl_username for s in settings.values()}
    granted = set()
    for line in script.splitlines():
        if "kafka-acls.sh" in line:
            words = shlex.split(line.replace("$admin", ""))
            resource = "topic" if "--topic" in words else "group"
            granted.add(
                (
                    words[words.index("--allow-principal") + 1],
                    resource,
                    words[words.index(f"--{resource}") + 1],
                    words[words.index("--operation") + 1].lower(),
                )
            )
    producer_args = _parse_vaewatch(
        IMAGE_ENTRYPOINT[1:] + _service_command(document["services"]["producer"])
    )
    wanted = set()
    for name, client, topic in (
        ("worker", "worker", ""),
        ("producer", "produce", producer_args.topic or ""),
        ("serve", "serve", ""),
    ):
        stream = settings[name].stream
        for spec in client_acls(client, stream, principal=f"User:{stream.sasl_username}",
                                topic=topic):  # fmt: skip
            wanted.add((spec.principal, spec.resource_type, spec.name, spec.operation))
    assert granted == wanted
    # Mutual TLS: each client's certificate is CN=<its SCRAM user>, i.e. the same principal.
    mtls = compose_document(MTLS, secrets)
    for name, mtls_settings in _client_settings(mtls).items():
        cert = _mounted_file(mtls, name, mtls_settings.stream.ssl_certfile)
        assert _common_name(cert) == settings[name].stream.sasl_username, name
    rule = env_dict(document["services"]["kafka"]["environment"])[
        "KAFKA_SSL_PRINCIPAL_MAPPING_RULES"
    ]
    assert rule.startswith("RULE:^CN=([^,]+),.*$/$1/"), rule


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_secured_endpoint_is_one_vaewatch_serves(
    variant: str, secrets: dict[str, str], rendered: dict[str, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:  # fmt: skip
    document = compose_document(VARIANTS[variant], secrets)
    services = document["services"]
    found = compose_endpoints(services, VARIANTS[variant][-1].name)
    found += prometheus_endpoints(PROMETHEUS_SECURED_CONFIG, services)
    where = Path(f"{OVERLAYS[variant].name} (rendered)")
    found += k8s_endpoints([(where, doc) for doc in rendered[variant]], tmp_path)
    assert endpoint_problems(found) == []
    schemes = {e.scheme for e in found if e.scheme}
    assert schemes == {"https"}, f"plain HTTP left in the secured variant: {found}"
    assert len(found) >= 18


def test_the_scheme_check_catches_plain_http_to_a_tls_endpoint(
    secrets: dict[str, str], tmp_path: Path
) -> None:
    services = compose_document(SASL, secrets)["services"]
    config = load_yaml(PROMETHEUS_SECURED_CONFIG)
    config["scrape_configs"][0]["scheme"] = "http"
    broken = tmp_path / "prometheus.secured.yml"
    broken.write_text(yaml.safe_dump(config))
    problems = endpoint_problems(prometheus_endpoints(broken, services))
    assert any("http, but the worker speaks https" in p for p in problems), problems
    # And the plain files against the secured settings: every endpoint is caught.
    plain = endpoint_problems(prometheus_endpoints(PROMETHEUS_CONFIG, services))
    assert len(plain) == 2, plain


def test_secured_prometheus_config_matches_the_plain_one_and_the_compose_secrets(
    secrets: dict[str, str],
) -> None:
    """Same jobs, targets and rules as prometheus.yml; HTTPS with the CA and the name each
    certificate carries; basic auth with the worker's user and the password file compose
    mounts, which holds the worker's password."""
    plain, secured = load_yaml(PROMETHEUS_CONFIG), load_yaml(PROMETHEUS_SECURED_CONFIG)
    tls_keys = {"scheme", "tls_config", "basic_auth"}
    assert {k: v for k, v in secured.items() if k != "scrape_configs"} == {
        k: v for k, v in plain.items() if k != "scrape_configs"
    }
    strip = [
        {k: v for k, v in job.items() if k not in tls_keys} for job in secured["scrape_configs"]
    ]
    assert strip == plain["scrape_configs"]
    document = compose_document(SASL, secrets)
    prometheus = document["services"]["prometheus"]
    assert (
        f"--config.file=/etc/prometheus/{PROMETHEUS_SECURED_CONFIG.name}" in prometheus["command"]
    )
    settings = _client_settings(document)
    for job in secured["scrape_configs"]:
        service = job["dns_sd_configs"][0]["names"][0]
        assert job["scheme"] == "https"
        ca = _mounted_file(document, "prometheus", job["tls_config"]["ca_file"])
        process_settings = settings[service]
        certfile = process_settings.metrics.tls_cert_file or process_settings.serve.ssl_certfile
        cert = _mounted_file(document, service, certfile)
        assert job["tls_config"]["server_name"] in _certificate_names(cert)
        check_client_tls_files(prefix="", cafile=str(ca), certfile=None, keyfile=None,
                               password=None)  # fmt: skip
        if service == "worker":
            auth = job["basic_auth"]
            metrics = process_settings.metrics
            assert auth["username"] == metrics.basic_auth_username
            password = _mounted_file(document, "prometheus", auth["password_file"]).read_text()
            assert password == metrics.basic_auth_password.get_secret_value()
        else:
            assert "basic_auth" not in job  # serve's /metrics is open


# -- Kubernetes ---------------------------------------------------------------------------------


def _rendered_one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


def _rendered_settings(
    docs: list[dict[str, Any]], container: dict[str, Any], folder: Path
) -> Settings:
    config = _rendered_one(docs, "ConfigMap", "vaewatch-config")["data"]["config.yaml"]
    path = folder / "config.yaml"
    path.write_text(config)
    return _settings(path, dockerfile_env(), _container_env(container))


def _secret_mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """{mount path: Secret name} of the Secret volumes the container mounts; a Secret volume
    holds one file per key, at <mountPath>/<key>."""
    volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    return {
        mount["mountPath"]: volumes[mount["name"]]
        for mount in container.get("volumeMounts", [])
        if mount["name"] in volumes
    }


def secret_references(docs: list[dict[str, Any]], folder: Path) -> set[tuple[str, str]]:
    """Every (Secret, key) the manifests use: environment from secretKeyRef, the files the
    settings name in Secret volumes, the ServiceMonitors' TLS and basic auth, KEDA's
    TriggerAuthentications."""
    found = set()
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec")
        for container in (pod or {}).get("containers", []):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref.get("optional", False) is False, f"{item['name']}: optional"
                    found.add((ref["name"], ref["key"]))
            if doc["kind"] != "Deployment":
                continue
            mounts = _secret_mounts(pod, container)
            settings = _rendered_settings(docs, container, folder)
            process = _parse_vaewatch(IMAGE_ENTRYPOINT[1:] + container["args"]).command
            for dotted in FILE_SETTINGS[process]:
                value = _setting(settings, dotted)
                if not value:
                    continue
                parent = str(PurePosixPath(value).parent)
                assert parent in mounts, (
                    f"{doc['metadata']['name']}: {dotted} {value} is in no Secret volume"
                )
                found.add((mounts[parent], PurePosixPath(value).name))
        if doc["kind"] == "ServiceMonitor":
            for endpoint in spec["endpoints"]:
                ca = endpoint.get("tlsConfig", {}).get("ca", {}).get("secret")
                if ca:
                    found.add((ca["name"], ca["key"]))
                for part in endpoint.get("basicAuth", {}).values():
                    found.add((part["name"], part["key"]))
        if doc["kind"] == "TriggerAuthentication":
            for ref in spec["secretTargetRef"]:
                found.add((ref["name"], ref["key"]))
    return found


def documented_secrets() -> set[tuple[str, str]]:
    """The (Secret, key) pairs of deploy/README.md's table of the Secrets to create."""
    text = (DEPLOY / "README.md").read_text()
    table = text.split("<!-- secured-secrets -->", 2)
    assert len(table) == 3, "deploy/README.md: the table between <!-- secured-secrets --> marks"
    found = set()
    for row in table[1].splitlines():
        match = re.match(r"\| `([a-z0-9-]+)` \| ([^|]+) \|", row)
        if match:
            for key in re.findall(r"`([^`]+)`", match.group(2)):
                found.add((match.group(1), key))
    return found


def test_the_overlays_use_only_documented_secrets_and_no_literal(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    used: set[tuple[str, str]] = set()
    for variant, docs in rendered.items():
        assert not [d for d in docs if d["kind"] == "Secret"], f"{variant}: a Secret is written"
        references = secret_references(docs, tmp_path)
        used |= references
        for doc in docs:
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                for item in container.get("env", []):
                    if item["name"] in SECRET_VARIABLES or item["name"].endswith("_PASSWORD"):
                        assert "value" not in item, f"{variant}: {item['name']} is written"
    used |= secret_references([doc for _, doc in k8s_documents()], tmp_path)
    documented = documented_secrets()
    assert used - documented == set(), "used but not in deploy/README.md's table"
    assert documented - used == set(), "in deploy/README.md's table but used nowhere"


@pytest.mark.parametrize("variant", OVERLAYS)
def test_overlay_config_differs_from_the_base_only_in_security(
    variant: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    docs = rendered[variant]
    base_config = yaml.safe_load(
        next(doc for _, doc in k8s_documents() if doc["kind"] == "ConfigMap")["data"]["config.yaml"]
    )
    config = yaml.safe_load(
        _rendered_one(docs, "ConfigMap", "vaewatch-config")["data"]["config.yaml"]
    )
    for section in base_config.keys() | config.keys():
        allowed = SECURITY_KEYS.get(section, set())
        ours = {k: v for k, v in config.get(section, {}).items() if k not in allowed}
        theirs = {k: v for k, v in base_config.get(section, {}).items() if k not in allowed}
        assert ours == theirs, f"{variant}: {section} differs from the base beyond security"
    worker = _rendered_one(docs, "Deployment", "vaewatch-worker")
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    check_vaewatch_env(f"{variant} worker", _container_env(container))
    settings = _rendered_settings(docs, container, tmp_path)
    assert settings.stream.security_protocol == {"sasl": "SASL_SSL", "mtls": "SSL"}[variant]
    assert settings.metrics.tls_cert_file and settings.metrics.tls_key_file
    env = _container_env(container)
    assert "VAEWATCH_METRICS__BASIC_AUTH_PASSWORD" in env
    assert ("VAEWATCH_STREAM__SASL_PASSWORD" in env) == (variant == "sasl")
    serve = _rendered_one(docs, "Deployment", "vaewatch-serve")
    (serve_container,) = serve["spec"]["template"]["spec"]["containers"]
    check_vaewatch_env(f"{variant} serve", _container_env(serve_container))
    serve_settings = _rendered_settings(docs, serve_container, tmp_path)
    assert serve_settings.serve.ssl_certfile and serve_settings.serve.ssl_keyfile
    if variant == "sasl":
        assert serve_settings.stream.sasl_username != settings.stream.sasl_username, (
            "the console has its own principal (read only)"
        )


@pytest.mark.parametrize("variant", OVERLAYS)
def test_overlay_keda_servicemonitor_and_topics_agree_with_the_config(
    variant: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    docs = rendered[variant]
    worker = _rendered_one(docs, "Deployment", "vaewatch-worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    stream = _rendered_settings(docs, container, tmp_path).stream

    # KEDA: the same cluster, its protocol, and credentials from a TriggerAuthentication.
    (trigger,) = _rendered_one(docs, "ScaledObject", "vaewatch-worker")["spec"]["triggers"]
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), meta
    assert meta["bootstrapServers"] == stream.bootstrap_servers
    assert meta["tls"] == "enable"
    if stream.security_protocol == "SASL_SSL":
        assert meta["sasl"] == KEDA_SASL[stream.sasl_mechanism]
    else:
        assert "sasl" not in meta
    auth = _rendered_one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    parameters = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
    wanted = {"sasl": {"username", "password", "ca"}, "mtls": {"cert", "key", "ca"}}[variant]
    assert parameters == wanted

    # The ServiceMonitor: HTTPS, the worker's CA, the worker's own basic-auth Secret.
    (endpoint,) = _rendered_one(docs, "ServiceMonitor", "vaewatch")["spec"]["endpoints"]
    env_refs = {
        item["name"]: (item["valueFrom"]["secretKeyRef"]["name"],
                       item["valueFrom"]["secretKeyRef"]["key"])
        for item in container["env"] if "valueFrom" in item and "secretKeyRef" in item["valueFrom"]
    }  # fmt: skip
    assert (endpoint["basicAuth"]["username"]["name"], endpoint["basicAuth"]["username"]["key"]) \
        == env_refs["VAEWATCH_METRICS__BASIC_AUTH_USERNAME"]  # fmt: skip
    assert (endpoint["basicAuth"]["password"]["name"], endpoint["basicAuth"]["password"]["key"]) \
        == env_refs["VAEWATCH_METRICS__BASIC_AUTH_PASSWORD"]  # fmt: skip
    settings = _rendered_settings(docs, container, tmp_path)
    cert_dir = str(PurePosixPath(settings.metrics.tls_cert_file).parent)
    assert endpoint["tlsConfig"]["ca"]["secret"]["name"] == _secret_mounts(pod, container)[cert_dir]
    service = _rendered_one(docs, "Service", "vaewatch")
    assert endpoint["tlsConfig"]["serverName"] == (
        f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    )

    # The topics Job: the base's topics and partitions, on the same cluster (the SASL_SSL
    # listener: the administrator keeps its password with mutual TLS too), as the admin.
    job = _rendered_one(docs, "Job", "vaewatch-topics")["spec"]["template"]["spec"]
    (topics,) = job["containers"]
    bootstrap = re.search(r'admin="--bootstrap-server (\S+) ', topics["args"][0]).group(1)
    assert bootstrap == _rendered_one(rendered["sasl"], "ScaledObject", "vaewatch-worker")[
        "spec"]["triggers"][0]["metadata"]["bootstrapServers"]  # fmt: skip
    assert bootstrap.rsplit(":", 1)[0] == stream.bootstrap_servers.rsplit(":", 1)[0]
    script = topics["args"][0].replace("$admin", f"--bootstrap-server {bootstrap}")
    base_job = next(d for _, d in k8s_documents() if d.get("kind") == "Job"
                    and d["metadata"]["name"] == "vaewatch-topics")  # fmt: skip
    base_script = base_job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    base_bootstrap = re.search(r"--bootstrap-server (\S+)", base_script).group(1)
    assert _topic_partitions(script, bootstrap) == _topic_partitions(base_script, base_bootstrap)
    assert "--command-config" in topics["args"][0]
    env = {item["name"] for item in topics["env"] if "secretKeyRef" in item.get("valueFrom", {})}
    assert {"KAFKA_ADMIN_USERNAME", "KAFKA_ADMIN_PASSWORD"} <= env
    for name in ("KAFKA_ADMIN_USERNAME", "KAFKA_ADMIN_PASSWORD"):
        assert f"${name}" in topics["args"][0]
    truststore = re.search(r"ssl\.truststore\.location=(\S+)", topics["args"][0]).group(1)
    mounts = {m["mountPath"] for m in topics["volumeMounts"]}
    assert str(PurePosixPath(truststore).parent) in mounts


def test_the_overlays_leave_the_base_untouched(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Same objects as deploy/k8s/ (plus KEDA's TriggerAuthentication); the PrometheusRule,
    PVC and trainer Job as they are."""
    base = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_documents() if "metadata" in d}
    for variant, docs in rendered.items():
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert names == base.keys() | {("TriggerAuthentication", "vaewatch-keda-kafka")}, variant
        for key in (("PrometheusRule", "vaewatch"), ("PersistentVolumeClaim", "vaewatch-models")):
            ours = copy.deepcopy(_rendered_one(docs, *key))
            ours["metadata"].pop("namespace", None)
            assert ours == base[key], f"{variant}: {key} changed"
