"""Fixtures that start the embedded Kafka-compatible broker (owned by the streams work)."""
