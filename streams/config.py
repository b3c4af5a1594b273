"""Settings of the streaming worker: Kafka, batching, metrics."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class StreamConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = "127.0.0.1:9092"
    input_topic: str = "images"
    alert_topic: str = "alerts"
    scores_topic: str = ""
    # record: one scores message per input record (the contract); batch: one message per input
    # partition and batch, holding the same objects as JSON Lines (far fewer producer sends).
    scores_format: Literal["record", "batch"] = "record"
    dlq_topic: str = "images.dlq"
    group_id: str = "vaewatch"
    client_id: str = "vaewatch-worker"
    codec: Literal["raw", "json"] = "raw"
    max_batch_size: int = Field(1024, ge=1)
    max_batch_delay_ms: int = Field(10, ge=0)
    # How the CPU scores while the next batch is polled: in a child process (own GIL, so torch
    # and kafka-python's threads run at once on two cores; batches cut by their deadline are
    # scored in the worker itself, at once), in a thread of the worker (they take turns with
    # the GIL), or inline (no overlap). Ignored on CUDA, which is asynchronous.
    cpu_scoring: Literal["process", "thread", "inline"] = "process"
    # Threads torch may use to score on the CPU (0 = torch's default, one per core). One: the
    # worker's own process needs the other core to consume and publish; OpenMP threads also
    # spin between small batches. Scale out with partitions and workers instead.
    cpu_threads: int = Field(1, ge=0)
    # The worker process's GIL switch interval (sys.setswitchinterval), ms, where torch runs in
    # that process (cpu_scoring thread or inline, CUDA); 0 keeps Python's 5. Every torch op
    # releases the GIL and must take it back from kafka-python's I/O thread; with 5 ms that
    # wait slows scoring by up to half (BENCHMARKS.md). Not applied with a scoring process.
    gil_switch_interval_ms: float = Field(1.0, ge=0)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # Group timeouts. The defaults make a group join take ~4 s instead of ~20 s; a worker polls
    # every few milliseconds, so max_poll_interval_ms only has to cover the slowest batch.
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(1000, ge=100)
    max_poll_interval_ms: int = Field(10000, ge=1000)
    request_timeout_ms: int = Field(30000, ge=1000)
    # How long the broker may hold a fetch that finds no data. Tansu (the embedded broker)
    # checks for new data only at half of the wait, then 3/4, ... so a record landing in an empty
    # fetch waits up to half of this; real Kafka answers as soon as data arrives. Lower values
    # cost more fetch round trips when idle (kafka-python: ~2.5 ms of CPU each).
    fetch_max_wait_ms: int = Field(10, ge=0)
    # Acknowledged offsets are committed at most this often (ms; 0 = after every batch). Each
    # commit is a broker round trip costing kafka-python ~2 ms of CPU; a crash re-delivers at
    # most this much more. Drain and rebalance commit at once regardless.
    commit_interval_ms: int = Field(100, ge=0)
    max_partition_fetch_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Producer (alerts, scores, dead letters): acks=all so an acknowledged send is durable.
    acks: Literal["all", "1", "0"] = "all"
    linger_ms: int = Field(2, ge=0)
    producer_batch_bytes: int = Field(1024 * 1024, ge=1024)
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    delivery_timeout_ms: int = Field(120000, ge=1000)
    # Reconnects to an unreachable broker back off exponentially up to this bound.
    reconnect_backoff_max_ms: int = Field(5000, ge=50)
    # How long one attempt to reach a bootstrap server may take before the worker backs off.
    bootstrap_timeout_ms: int = Field(5000, ge=100)
    # On SIGTERM/SIGINT: how long to wait for outstanding sends before giving up (uncommitted
    # records are then re-delivered to the next worker: nothing is lost).
    drain_timeout_s: float = Field(30.0, gt=0)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True


class MetricsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(9108, ge=0, le=65535)
