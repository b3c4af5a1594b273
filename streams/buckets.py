"""Histogram buckets shared by the worker's metrics and the HTTP service's, declared once so the
dashboards compare the two bucket for bucket. Plain tuples: importing them loads no Kafka client
and no metrics library."""

from __future__ import annotations

# Images per batch sent to the device: powers of two up to the detector's default batch cap.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# Seconds the device takes over one batch: a single image on a CPU to a full batch on a GPU.
INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Seconds a request or a record waits end to end.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
