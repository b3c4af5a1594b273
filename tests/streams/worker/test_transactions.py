"""Transactions.abort after a send the broker answered "your epoch is stale": kafka-python 3.0
counts INVALID_PRODUCER_EPOCH as recoverable and would bump the epoch under the same id. With
a stable stream.transactional_id that fenced the other worker back and the two took turns,
neither stopping (test_exactly_once_live.py, one run in two on a quiet machine); with the
default id the worker never said it had been fenced. Both now go the way of ProducerFencedError."""

from __future__ import annotations

import logging

import pytest
from kafka.errors import InvalidProducerEpochError, KafkaError, ProducerFencedError
from prometheus_client import CollectorRegistry

from streams.config import StreamConfig
from streams.worker.metrics import WorkerMetrics
from streams.worker.transactions import ProducerFailedError, TransactionalProducer, Transactions


class _Producer:
    """What Transactions asks of a transactional producer, recorded; never fatal by itself."""

    def __init__(self, calls: list[str], **_: object) -> None:
        self.calls = calls
        self.config = {"transactional_id": "t"}
        self._sender = self  # streams.client_internals.force_close_producer

    def force_close(self) -> None:
        self.calls.append("force_close")

    def init_transactions(self) -> None:
        self.calls.append("init")

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def abort_transaction(self, timeout_ms: int | None = None) -> None:
        self.calls.append("abort")

    def close(self, timeout: float | None = None) -> None:
        self.calls.append("close")


def _transactions(calls: list[str], *, stable_id: str) -> Transactions:
    config = StreamConfig(processing_guarantee="exactly_once", transactional_id=stable_id)
    producer = TransactionalProducer(config, make=lambda **kw: _Producer(calls, **kw))
    transactions = Transactions(
        producer=producer,
        consumer=object(),
        config=config,
        metrics=WorkerMetrics(registry=CollectorRegistry(), score_buckets=(1.0,)),
        on_error=lambda kind, exc: None,
    )
    transactions.init()
    transactions.begin()
    return transactions


@pytest.mark.parametrize("error", [InvalidProducerEpochError, ProducerFencedError])
def test_a_worker_with_a_stable_id_stops_in_one_line_rather_than_fence_back(error) -> None:
    calls: list[str] = []
    transactions = _transactions(calls, stable_id="shared-id")
    with pytest.raises(ProducerFailedError) as failed:
        transactions.abort("a send failed", timeout_s=1.0, renew=True, cause=error())
    message = str(failed.value)
    assert message.startswith(f"fenced ({error.__name__})") and "'shared-id'" in message
    assert "\n" not in message
    assert calls == ["init", "begin"]  # no second InitProducerId under the shared id


def test_a_worker_with_its_own_id_says_it_was_fenced_and_goes_on(caplog) -> None:
    calls: list[str] = []
    transactions = _transactions(calls, stable_id="")
    with caplog.at_level(logging.ERROR, logger="streams.worker.transactions"):
        transactions.abort(
            "a send failed", timeout_s=1.0, renew=True, cause=InvalidProducerEpochError()
        )
    assert "the producer was fenced (InvalidProducerEpochError" in caplog.text
    assert calls == ["init", "begin", "force_close", "close", "init"]  # a fresh one, initialised


def test_another_failed_send_renews_without_calling_it_fenced(caplog) -> None:
    calls: list[str] = []
    transactions = _transactions(calls, stable_id="shared-id")
    with caplog.at_level(logging.ERROR, logger="streams.worker.transactions"):
        transactions.abort("a send failed", timeout_s=1.0, renew=True, cause=KafkaError())
    assert "fenced" not in caplog.text
    assert calls == ["init", "begin", "force_close", "close", "init"]
