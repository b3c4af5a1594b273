"""Settings of the streaming worker: Kafka, batching, metrics."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class StreamConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka brokers, comma-separated host:port."
    )
    input_topic: str = Field(
        "images", description="Images to score (see stream.codec for the value format)."
    )
    alert_topic: str = Field(
        "alerts",
        description="One JSON object per anomaly, keyed topic/partition/offset "
        "(docs/wire-contract.md).",
    )
    alert_format: Literal["record", "batch"] = Field(
        "record",
        description="record: one alert message per anomaly, keyed topic/partition/offset, "
        "input headers passed through (the contract). batch: one message per input partition "
        "and batch, holding the same alert objects as JSON Lines, keyed "
        "topic/partition/first-last, without per-record headers; far fewer producer sends when "
        "many records alert (docs/wire-contract.md).",
    )
    scores_topic: str = Field(
        "",
        description="Every scored record goes here too when set, with an anomaly flag "
        "(empty = off).",
    )
    scores_format: Literal["record", "batch"] = Field(
        "record",
        description="record: one scores message per input record, keyed topic/partition/offset, "
        "input headers passed through (the contract). batch: one message per input "
        "partition and batch, holding the same objects as JSON Lines, keyed "
        "topic/partition/first-last, without per-record headers; far fewer producer "
        "sends.",
    )
    dlq_topic: str = Field(
        "images.dlq",
        description="Records that cannot be decoded or validated go here unchanged, with the "
        "reason in headers.",
    )
    group_id: str = Field(
        "vaewatch",
        description="Consumer group: workers with the same group share the input topic's "
        "partitions.",
    )
    client_id: str = Field(
        "vaewatch-worker",
        description="Kafka client id of the worker's consumer and producer (shows up in broker "
        "logs and quotas).",
    )
    codec: Literal["raw", "json", "image"] = Field(
        "raw",
        description="raw: the value is 784 bytes (uint8, row-major 28x28); json: an object "
        'with "pixels" (784 ints) or "b64" (base64 of the 784 bytes), optional "id"; image: an '
        "image file (PNG, JPEG, BMP, TIFF, WebP, GIF) of any size, made 28x28 by the bundle's "
        "preprocessing (docs/wire-contract.md).",
    )
    max_batch_size: int = Field(
        1024,
        ge=1,
        description="A batch is scored when it holds this many records or its first record has "
        "waited max_batch_delay_ms, whichever comes first.",
    )
    max_batch_delay_ms: int = Field(
        10,
        ge=0,
        description="Longest wait of a batch's first record before the batch is scored, ms (0 = "
        "score whatever one poll returned).",
    )
    cpu_scoring: Literal["process", "inline"] = Field(
        "process",
        description="How the CPU scores while the worker polls the next batch: process (a child "
        "process with its own GIL, so torch and kafka-python's threads run at once on "
        "two cores; batches cut by their deadline are scored in the worker itself, at "
        "once) or inline (in the worker, no overlap). Ignored on CUDA, which is "
        "asynchronous.",
    )
    scoring_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest wait for the scoring process to answer for one batch; past it the "
        "process counts as hung: it is killed, restarted and the batch scored again.",
    )
    cpu_threads: int = Field(
        1,
        ge=0,
        description="Threads torch may use to score on the CPU (0 = torch's default, one per "
        "core). One leaves the other core to the worker's own process to consume and "
        "publish, and OpenMP threads spin between small batches; scale out with "
        "partitions and workers instead (BENCHMARKS.md).",
    )
    gil_switch_interval_ms: float = Field(
        1.0,
        ge=0,
        description="The worker process's GIL switch interval (sys.setswitchinterval), ms, where "
        "torch runs in that process (cpu_scoring inline, CUDA); 0 keeps "
        "Python's 5. Every torch op releases the GIL and must take it back from "
        "kafka-python's I/O thread; a short interval bounds that wait (BENCHMARKS.md). "
        "Not applied with a scoring process.",
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest",
        description="Where a group without committed offsets starts: earliest (replay the topic) "
        "or latest.",
    )
    session_timeout_ms: int = Field(
        6000,
        ge=1000,
        description="Consumer group session timeout, ms. With the group defaults a group join "
        "takes seconds, not tens of seconds (BENCHMARKS.md).",
    )
    heartbeat_interval_ms: int = Field(
        1000, ge=100, description="Consumer group heartbeat interval, ms."
    )
    max_poll_interval_ms: int = Field(
        10000,
        ge=1000,
        description="Longest time between two polls before the worker leaves its group, ms; the "
        "worker polls every few milliseconds, so this only has to cover the slowest "
        "batch.",
    )
    request_timeout_ms: int = Field(
        30000, ge=1000, description="How long a broker request may take before it is retried, ms."
    )
    fetch_max_wait_ms: int = Field(
        10,
        ge=0,
        description="How long the broker may hold a fetch that finds no data, ms. The embedded "
        "broker (Tansu) notices new data only at half of this wait, so a record can "
        "wait up to half of it; real Kafka answers when data arrives, so raise it "
        "there (e.g. 500) to save idle fetch round trips, each of which costs "
        "kafka-python CPU (BENCHMARKS.md).",
    )
    commit_interval_ms: int = Field(
        100,
        ge=0,
        description="Acknowledged offsets are committed at most this often, ms (0 = after every "
        "batch). Each commit is a broker round trip that costs kafka-python CPU; a "
        "crash re-delivers at most this much more. The SIGTERM drain and rebalances "
        "commit at once.",
    )
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="at_least_once: outputs first, then the offsets (a crash re-delivers, so "
        "subscribers may see duplicates, keyed topic/partition/offset). exactly_once: the "
        "alerts, scores and dead letters of a set of batches and their input offsets are "
        "committed in one Kafka transaction; subscribers that read with "
        "isolation_level=read_committed see every output once (docs/delivery.md). Needs a "
        "broker with transactions (Apache Kafka).",
    )
    transaction_interval_ms: int = Field(
        100,
        ge=10,
        description="exactly_once: a transaction is committed this often, ms (Kafka Streams' "
        "default for exactly-once too). Longer amortises the commit's round trips over more "
        "batches; outputs become visible to read_committed subscribers only at the commit, so "
        "it adds up to this much latency (BENCHMARKS.md).",
    )
    transactional_id: str = Field(
        "",
        description="exactly_once: the producer's transactional.id. Empty (the default) = "
        "one of each worker process's own (<group_id>-<host name>-<random>): workers never "
        "fence each other, the group generation fences zombies (KIP-447), but a killed "
        "worker's open transaction holds read_committed readers and the next owner of its "
        "partitions for up to transaction_timeout_ms. A stable id lets its restart abort that "
        "transaction at once; give each worker its own: one fenced by another with its id "
        "exits 1 (docs/delivery.md).",
    )
    transaction_timeout_ms: int = Field(
        10000,
        ge=1000,
        description="exactly_once: the broker aborts a transaction left open this long by a "
        "worker that died, ms; until then read_committed subscribers wait at its first "
        "output.",
    )
    max_partition_fetch_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Bytes fetched per partition per request (4 MiB holds about 5,000 raw images).",
    )
    acks: Literal["all", "1", "0"] = Field(
        "all",
        description="Acknowledgement the producer of alerts, scores and dead letters waits for: "
        "all (an acknowledged send is durable), 1 (the leader only) or 0 (none).",
    )
    linger_ms: int = Field(
        2,
        ge=0,
        description="How long the producer waits to fill a request, ms; small keeps alert latency "
        "low.",
    )
    producer_batch_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest producer request batch per partition, bytes."
    )
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none",
        description="Compression of produced messages: none, gzip, snappy, lz4 or zstd (the last "
        "three need their Python packages).",
    )
    delivery_timeout_ms: int = Field(
        120000,
        ge=1000,
        description="A send not acknowledged within this time fails, ms; the worker then "
        "retries it (send_retries) or dead-letters its record as unsendable.",
    )
    max_request_size: int = Field(
        1024 * 1024,
        ge=16 * 1024,
        description="Largest output record (bytes) the producer sends; a dead-letter copy of a "
        "larger input record is cut to fit and marked unsendable.",
    )
    send_retries: int = Field(
        5,
        ge=0,
        description="Retries of a send that failed temporarily (timeouts, leader changes); "
        "consumption pauses meanwhile. Then the record counts as unsendable.",
    )
    retry_backoff_ms: int = Field(
        200, ge=1, description="Wait before the first retry of a failed send; doubles per retry."
    )
    on_unsendable: Literal["fail", "skip"] = Field(
        "fail",
        description="A record whose outputs cannot be sent or that the broker refuses goes to "
        "the dead-letter topic as a trimmed (or bare) copy (reason unsendable). If even that "
        "fails: fail = stop and exit non-zero without committing it (re-delivered on "
        'restart); skip = commit past it, counted in vaewatch_errors_total{kind="skipped"} '
        "(docs/delivery.md).",
    )
    max_unacked_records: int = Field(
        8192,
        ge=1,
        description="Backpressure: records consumed whose outputs are not all acknowledged; at "
        "this bound the worker pauses its partitions until acks catch up.",
    )
    max_unacked_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Backpressure: bytes (inputs and outputs) of those records; same effect.",
    )
    liveness_timeout_s: float = Field(
        120.0,
        gt=0,
        description="/healthz answers 503 when the worker has had work (records in hand or "
        "sends outstanding) but made no progress for this long, or its loop has not come round "
        "for this long (stuck inside a call). Keep it above scoring_timeout_s and "
        "drain_timeout_s, which a healthy loop may wait out.",
    )
    reconnect_backoff_max_ms: int = Field(
        5000,
        ge=50,
        description="Reconnects to an unreachable broker back off exponentially up to this bound, "
        "ms.",
    )
    bootstrap_timeout_ms: int = Field(
        5000,
        ge=100,
        description="How long one attempt to reach a bootstrap server may take, ms; the worker "
        "then backs off and retries, reporting not ready.",
    )
    drain_timeout_s: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM or SIGINT (or a send that fails for good): the whole shutdown's "
        "budget, seconds. Publishing what is in hand, waiting for acknowledgements, the commit, "
        "leaving the group and closing the clients all keep to it; what is not acknowledged by "
        "then is not committed, so it is re-delivered to the next worker (nothing is lost). "
        "Keep it below the orchestrator's grace period (Kubernetes: "
        "terminationGracePeriodSeconds).",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="Kafka security, passed through to kafka-python: PLAINTEXT, SSL, "
        "SASL_PLAINTEXT or SASL_SSL.",
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL only)."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(
        None,
        description="SASL password; better set from the environment "
        "(VAEWATCH_STREAM__SASL_PASSWORD); never shown in logs.",
    )
    ssl_cafile: str | None = Field(
        None,
        description="CA bundle (PEM file) that the broker's certificate is checked against (SSL).",
    )
    ssl_certfile: str | None = Field(
        None, description="Client certificate (PEM file) for SSL client authentication."
    )
    ssl_keyfile: str | None = Field(None, description="Private key (PEM file) of ssl_certfile.")
    ssl_key_password: SecretStr | None = Field(
        None,
        description="Password of an encrypted ssl_keyfile; better set from the environment "
        "(VAEWATCH_STREAM__SSL_KEY_PASSWORD); never shown in logs.",
    )
    ssl_check_hostname: bool = Field(
        True, description="Check that the broker's certificate matches its host name."
    )


class MetricsConfig(BaseModel):
    """The worker's HTTP endpoint. Its TLS and basic-auth settings follow Prometheus' own web
    configuration (tls_server_config, basic_auth_users), which Prometheus scrapes with
    `scheme: https`, `tls_config.ca_file` and `basic_auth`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(
        "0.0.0.0",
        description="Interface where the worker serves Prometheus metrics (/metrics), /healthz and "
        "/readyz (0.0.0.0 = all interfaces, for containers; 127.0.0.1 keeps them "
        "local).",
    )
    port: int = Field(
        9108,
        ge=0,
        le=65535,
        description="Port of the metrics endpoint (0 = a free one, logged at start).",
    )
    tls_cert_file: str | None = Field(
        None,
        description="Certificate (PEM, chain) of the endpoint: when set, it speaks HTTPS only "
        "(docs/secured-kafka.md).",
    )
    tls_key_file: str | None = Field(None, description="Private key (PEM) of tls_cert_file.")
    tls_client_ca_file: str | None = Field(
        None,
        description="When set, every client must present a certificate signed by a CA in this "
        "PEM file (Prometheus' client_auth_type RequireAndVerifyClientCert).",
    )
    basic_auth_username: str | None = Field(
        None,
        description="When set with basic_auth_password, /metrics and /admin/ ask for HTTP basic "
        "auth; /healthz and /readyz stay open for the orchestrator's probes.",
    )
    basic_auth_password: SecretStr | None = Field(
        None,
        description="Basic-auth password; better set from the environment "
        "(VAEWATCH_METRICS__BASIC_AUTH_PASSWORD); never shown in logs.",
    )

    @model_validator(mode="after")
    def _tls_and_auth_complete(self) -> MetricsConfig:
        if (self.tls_key_file or self.tls_client_ca_file) and not self.tls_cert_file:
            raise ValueError("tls_key_file and tls_client_ca_file need tls_cert_file")
        if (self.basic_auth_username is None) != (self.basic_auth_password is None):
            raise ValueError("set both basic_auth_username and basic_auth_password, or neither")
        return self
