"""ResultPublisher and the in-flight batch's send policy against a producer that refuses what
kafka-python's send() refuses (a record with neither key nor value, headers that are not
(str, bytes), a record over max_request_size by kafka-python's own size estimate): poison inputs
end as one score or one dead letter with a reason, every output is strict JSON, every dead
letter can be sent."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import MessageSizeTooLargeError
from kafka.record.default_records import DefaultRecordBatchBuilder

from detector import Scores
from streams.codec import MAX_ID_BYTES, decode_batch
from streams.config import StreamConfig
from streams.worker.batch import InFlightBatch
from streams.worker.publish import ResultPublisher, output_values

MIB = 1024 * 1024
IMAGE = bytes(range(256)) * 3 + bytes(16)  # 784 bytes
JSON_IMAGE = json.dumps({"b64": base64.b64encode(IMAGE).decode()}).encode()
RESERVED = (
    "vaewatch.error",
    "vaewatch.error.detail",
    "vaewatch.source.topic",
    "vaewatch.source.partition",
    "vaewatch.source.offset",
    "vaewatch.source.timestamp_ms",
    "vaewatch.original.size",
)


class _Acked:
    is_done = True
    exception = None

    def failed(self) -> bool:
        return False


class FakeProducer:
    """Accepts what kafka-python's KafkaProducer.send() accepts, acknowledges it at once."""

    def __init__(self, max_request_size: int = MIB) -> None:
        self.max_request_size = max_request_size
        self.sent: list[tuple[str, Any, Any, list]] = []

    def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def send(self, topic, value=None, key=None, headers=None, partition=None, timestamp_ms=None):
        if value is None and key is None:
            raise ValueError("Need at least one: key or value")
        headers = headers or []
        for header in headers:
            if not (isinstance(header, tuple) and len(header) == 2):
                raise TypeError("All headers items must be (str, bytes) tuples")
            if not (isinstance(header[0], str) and isinstance(header[1], bytes)):
                raise TypeError("All headers items must be (str, bytes) tuples")
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
        if size > self.max_request_size:
            raise MessageSizeTooLargeError(f"{size} bytes, over {self.max_request_size}")
        self.sent.append((topic, value, key, headers))
        return _Acked()

    def on(self, topic: str) -> list[tuple[str, Any, Any, list]]:
        return [s for s in self.sent if s[0] == topic]


def _record(offset: int, value: bytes | None = IMAGE, *, key=None, headers=None, ts: Any = "now"):
    headers = list(headers or [])
    header_size = (
        sum(len(k.encode()) + (len(v) if v is not None else 0) for k, v in headers)
        if headers
        else -1
    )
    timestamp = int(time.time() * 1000) if ts == "now" else ts
    return ConsumerRecord(
        "images", 0, -1, offset, timestamp, 0, key, value, headers, None,
        len(key) if key is not None else -1,
        len(value) if value is not None else -1,
        header_size,
    )  # fmt: skip


def _publisher(
    producer: FakeProducer,
    *,
    scores_topic: str = "scores",
    alert_format: str = "record",
    scores_format: str = "record",
    clock: Callable[[], float] = time.time,
) -> ResultPublisher:
    return ResultPublisher(
        producer=producer,
        alert_topic="alerts",
        scores_topic=scores_topic,
        dlq_topic="dlq",
        model_version="v1",
        threshold=1.0,
        alert_format=alert_format,
        scores_format=scores_format,
        max_request_size=producer.max_request_size,
        clock=clock,
    )


def _scores(values: list[float]) -> Scores:
    scores = np.asarray(values, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        return Scores(
            scores=scores,
            p_values=np.where(np.isfinite(scores), 0.5, np.nan),
            anomalous=scores > 1.0,
        )


def _publish(records, *, codec="raw", score=2.0, scores=None, producer=None, scores_topic="scores"):
    producer = producer or FakeProducer()
    publisher = _publisher(producer, scores_topic=scores_topic)
    decoded = decode_batch([r.value for r in records], codec=codec, keys=[r.key for r in records])
    scored = _scores(scores if scores is not None else [score] * decoded.n_valid)
    return producer, publisher, _sent(publisher, records, decoded, scored)


def _sent(publisher: ResultPublisher, records, decoded, scores) -> InFlightBatch:
    """A batch whose outputs were built and handed to the producer."""
    batch = InFlightBatch(0, records, decoded, None, publisher, 0.0, 0.0)
    batch.send(publisher.build(records, decoded, scores if decoded.n_valid else None))
    return batch


def _strict(value: bytes) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in an output: not JSON")

    return json.loads(value, parse_constant=refuse)


def _settle(batch: InFlightBatch, config: StreamConfig | None = None) -> list:
    """Settle one sent batch (every send is answered at once, so one call settles it,
    unsendable copies included); returns the errors it reported."""
    errors: list = []
    assert batch.settle(config or StreamConfig(), lambda kind, exc: errors.append((kind, exc)))
    return errors


def _letters(producer: FakeProducer) -> dict[int, dict[str, bytes]]:
    out: dict[int, dict[str, bytes]] = {}
    for _, _, _, headers in producer.on("dlq"):
        named = dict(headers)
        offset = int(named["vaewatch.source.offset"])
        assert offset not in out, f"record {offset} dead-lettered twice"
        out[offset] = named
    return out


# --- a tombstone without a key: kafka-python cannot send it as it is -------------------------


@pytest.mark.parametrize("codec", ["raw", "json"])
def test_a_keyless_tombstone_is_a_null_value_dead_letter(codec: str) -> None:
    good = IMAGE if codec == "raw" else JSON_IMAGE
    records = [_record(0, good), _record(1, None), _record(2, None, key=b"k")]
    producer, _, published = _publish(records, codec=codec, score=0.5)
    assert not [f for f in published.futures if f.failed()]
    assert _settle(published) == []
    letters = {
        int(dict(h)["vaewatch.source.offset"]): (v, k, dict(h)) for _, v, k, h in producer.on("dlq")
    }
    assert letters[1][0] == b"" and letters[1][1] is None  # no value, no key: an empty value
    assert letters[2][0] is None and letters[2][1] == b"k"  # a keyed tombstone stays one
    for offset in (1, 2):
        assert letters[offset][2]["vaewatch.error"] == b"null_value"
    assert published.outputs.dead_letter_reasons == ["null_value", "null_value"]
    assert [_strict(v)["offset"] for _, v, _, _ in producer.on("scores")] == [0]


# --- an `id` header that cannot go into an alert --------------------------------------------


@pytest.mark.parametrize(
    "header_id",
    [b"x" * 600_000, b"\xff" * 250_000, b"\xff" * 300, b"\x01" * 200, "\u00e9".encode() * 200],
    ids=["600k-ascii", "250k-invalid-utf8", "300-invalid-utf8", "200-control", "200-e-acute"],
)
def test_an_id_header_too_long_for_an_alert_is_a_bad_id_dead_letter(header_id: bytes) -> None:
    records = [_record(0), _record(1, headers=[("id", header_id), ("t", b"1")]), _record(2)]
    producer, _, published = _publish(records, score=2.0)
    assert not [f for f in published.futures if f.failed()]
    assert _settle(published) == []
    letters = _letters(producer)
    assert set(letters) == {1}
    assert letters[1]["vaewatch.error"] == b"bad_id"
    assert str(MAX_ID_BYTES).encode() in letters[1]["vaewatch.error.detail"]
    for topic in ("alerts", "scores"):
        assert [_strict(v)["offset"] for _, v, _, _ in producer.on(topic)] == [0, 2]
    assert (
        published.outputs.n_normal,
        published.outputs.n_anomaly,
        published.outputs.n_alerts,
    ) == (0, 2, 2)
    assert len(published.outputs.scores) == 2 and len(published.outputs.timestamps_ms) == 2
    assert published.outputs.dead_letter_reasons == ["bad_id"]


def test_an_id_header_that_fits_is_copied_into_the_alert() -> None:
    header_id = b"\xff" * 100 + b"x" * 400  # 100 * 5 + 400 + 2 bytes as JSON
    records = [_record(0, headers=[("id", header_id)])]
    producer, _, published = _publish(records, score=2.0)
    (alert,) = producer.on("alerts")
    assert _strict(alert[1])["id"] == header_id.decode("utf-8", "backslashreplace")
    assert published.outputs.dead_letter_reasons == []


def test_a_json_id_wins_over_a_long_id_header() -> None:
    value = json.dumps({"b64": base64.b64encode(IMAGE).decode(), "id": "j"}).encode()
    records = [_record(0, value, headers=[("id", b"x" * 600_000)])]
    producer, _, published = _publish(records, codec="json", score=2.0)
    assert _settle(published) == []
    assert [_strict(v)["id"] for _, v, _, _ in producer.on("alerts")] == ["j"]


# --- scores that JSON cannot hold ------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("scores_topic", ["scores", ""])
def test_a_non_finite_score_is_a_scoring_error_dead_letter(bad: float, scores_topic: str) -> None:
    records = [_record(i) for i in range(3)]
    producer, _, published = _publish(records, scores=[2.0, bad, 0.5], scores_topic=scores_topic)
    assert _settle(published) == []
    for _, value, _, _ in producer.on("alerts") + producer.on("scores"):
        assert _strict(value)["offset"] != 1
    letters = _letters(producer)
    assert set(letters) == {1}
    assert letters[1]["vaewatch.error"] == b"scoring_error"
    assert b"finite" in letters[1]["vaewatch.error.detail"]
    assert (published.outputs.n_normal, published.outputs.n_anomaly) == (1, 1)
    assert np.isfinite(published.outputs.scores).all() and len(published.outputs.scores) == 2


# --- timestamps ------------------------------------------------------------------------------


def test_absurd_timestamps_are_scored_and_kept_out_of_the_latency() -> None:
    now = int(time.time() * 1000)
    records = [_record(0, ts=-1), _record(1, ts=2**63 - 1), _record(2, ts=now), _record(3, ts=0)]
    producer, _, published = _publish(records, score=2.0)
    alerts = [_strict(v) for _, v, _, _ in producer.on("alerts")]
    assert [a["timestamp_ms"] for a in alerts] == [-1, 2**63 - 1, now, 0]
    # Latency only from timestamps that can be one: not "none" (-1), not in the future.
    assert sorted(published.outputs.timestamps_ms.tolist()) == [0, now]


def test_a_record_without_a_timestamp_is_scored_and_dead_lettered_without_one() -> None:
    """Message format v0 (Kafka < 0.10) has no timestamp: kafka-python reports None."""
    records = [_record(0, ts=None), _record(1, b"short", ts=None), _record(2)]
    producer, _, published = _publish(records, score=2.0)
    alerts = {body["offset"]: body for body in (_strict(v) for _, v, _, _ in producer.on("alerts"))}
    assert set(alerts) == {0, 2} and alerts[0]["timestamp_ms"] == -1
    assert _letters(producer)[1]["vaewatch.source.timestamp_ms"] == b"-1"
    assert len(published.outputs.timestamps_ms) == 1


# --- dead letters carry one reason -----------------------------------------------------------


def test_a_dead_letter_replaces_the_reason_headers_its_input_carried() -> None:
    """A dead letter replayed into the input (a usual repair) carries the old reason headers;
    its new dead letter must not hold two of each."""
    stale = [(name, b"stale") for name in RESERVED] + [("trace", b"t")]
    records = [_record(7, b"short", headers=stale)]
    producer, _, _ = _publish(records)
    ((_, _, _, headers),) = producer.on("dlq")
    names = [name for name, _ in headers]
    assert names.count("trace") == 1
    for name in RESERVED[:-1]:
        assert names.count(name) == 1, name
    assert "vaewatch.original.size" not in names
    assert dict(headers)["vaewatch.error"] == b"wrong_length"
    assert dict(headers)["vaewatch.source.offset"] == b"7"


# --- outputs too large to send ---------------------------------------------------------------


def test_a_record_whose_alert_and_score_are_both_too_large_is_dead_lettered_once() -> None:
    big = [("blob", b"b" * (MIB - 200))]  # fits the input; its alert and score do not
    records = [_record(0), _record(1, headers=big), _record(2)]
    producer, _, published = _publish(records, score=2.0)
    errors = _settle(published)
    assert [kind for kind, _ in errors] == ["produce", "produce"]
    letters = _letters(producer)
    assert set(letters) == {1}
    assert letters[1]["vaewatch.error"] == b"unsendable"
    assert published.outputs.dead_letter_reasons == ["unsendable"]


def test_an_unsendable_copy_keeps_the_value_when_a_header_is_what_is_too_large() -> None:
    record = _record(3, headers=[("blob", b"b" * (2 * MIB)), ("small", b"s")])
    producer = FakeProducer()
    publisher = _publisher(producer)
    copy = publisher.dead_letter_copy(record, MessageSizeTooLargeError("too large"), None, source=0)
    assert not publisher.send(copy).failed()
    assert copy.value == IMAGE
    assert dict(copy.headers)["small"] == b"s" and "blob" not in dict(copy.headers)


# --- property: whatever the record, one score or one dead letter, all of it sendable JSON ----

_header_name = st.one_of(st.sampled_from(["id", "trace", "vaewatch.error", ""]), st.text())
_header_value = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.builds(lambda n, b: b * n, st.integers(0, 70_000), st.sampled_from([b"x", b"\xff"])),
)


@st.composite
def _input(draw: st.DrawFn, offset: int):
    value = draw(
        st.one_of(
            st.just(IMAGE),
            st.none(),
            st.binary(max_size=800),
            st.builds(lambda n: b"v" * n, st.integers(0, 80_000)),
        )
    )
    key = draw(st.one_of(st.none(), st.binary(max_size=20), st.sampled_from([b"k" * 5000])))
    headers = draw(st.lists(st.tuples(_header_name, _header_value), max_size=4))
    ts = draw(st.sampled_from(["now", -1, 0, None, 2**63 - 1]))
    if value is None and key is None and draw(st.booleans()):
        key = b"k"
    return _record(offset, value, key=key, headers=headers, ts=ts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    n=st.integers(1, 8),
    scores_topic=st.sampled_from(["scores", ""]),
    policy=st.sampled_from(["fail", "skip"]),
    alert_format=st.sampled_from(["record", "batch"]),
    scores_format=st.sampled_from(["record", "batch"]),
)
def test_every_record_ends_as_one_score_or_one_dead_letter(
    data: st.DataObject, n: int, scores_topic: str, policy: str, alert_format: str,
    scores_format: str,
) -> None:  # fmt: skip
    records = [data.draw(_input(i)) for i in range(n)]
    producer = FakeProducer(max_request_size=64 * 1024)
    publisher = _publisher(
        producer, scores_topic=scores_topic, alert_format=alert_format, scores_format=scores_format
    )
    decoded = decode_batch([r.value for r in records], codec="raw", keys=[r.key for r in records])
    raw_scores = data.draw(
        st.lists(
            st.sampled_from([0.5, 2.0, float("nan"), float("inf")]),
            min_size=decoded.n_valid,
            max_size=decoded.n_valid,
        )
    )
    published = _sent(publisher, records, decoded, _scores(raw_scores) if raw_scores else None)
    config = StreamConfig(on_unsendable=policy)
    _settle(published, config)  # never raises: every dead letter can be sent

    outcome: dict[int, list[str]] = {i: [] for i in range(n)}
    alerted: list[int] = []
    for topic, value, _, headers in producer.sent:
        if topic == "dlq":
            continue
        for line in output_values(value, headers):
            body = _strict(line)
            assert body["topic"] == "images"
            if topic == "scores":
                outcome[body["offset"]].append("scored")
            else:
                assert body["anomaly"] is True
                alerted.append(body["offset"])
    assert len(alerted) == len(set(alerted)) == published.outputs.n_alerts
    for offset, headers in _letters(producer).items():
        assert len(headers["vaewatch.error.detail"].decode()) <= 200
        outcome[offset].append(headers["vaewatch.error"].decode())
    if scores_topic:
        # One outcome each: an alert and its score are the same size, they fail together. When
        # one of them is framed (without the input headers) the other alone may be too large:
        # the record is then scored and dead-lettered for its alert.
        split = alert_format != scores_format
        assert all(
            len(o) == 1 or (split and sorted(o) == ["scored", "unsendable"])
            for o in outcome.values()
        ), outcome
    else:
        assert all(len(o) <= 1 for o in outcome.values()), outcome
    assert published.outputs.n_normal + published.outputs.n_anomaly == len(published.outputs.scores)
    assert np.isfinite(published.outputs.scores).all()
    sent_reasons = [headers["vaewatch.error"].decode() for headers in _letters(producer).values()]
    assert sorted(published.outputs.dead_letter_reasons) == sorted(sent_reasons)


# --- batch-framed alerts ---------------------------------------------------------------------


@pytest.mark.parametrize("scores_topic", ["scores", ""])
def test_batch_framed_alerts_hold_the_objects_of_per_record_alerts(scores_topic: str) -> None:
    """stream.alert_format=batch: one message per input partition and batch, keyed by its first
    and last offset, holding as JSON Lines exactly the objects record format sends one by one
    (docs/wire-contract.md, Frames); the scores keep their own format."""
    records = [_record(i, headers=[("id", f"img-{i}".encode())]) for i in range(6)]
    values = [2.0, 0.5, 3.0, 0.5, 0.5, 4.0]
    decoded = decode_batch([r.value for r in records], codec="raw")
    scored_at = time.time()  # the same scored_at_ms in both formats
    sent = {}
    for fmt in ("record", "batch"):
        producer = FakeProducer()
        publisher = _publisher(
            producer, scores_topic=scores_topic, alert_format=fmt, clock=lambda: scored_at
        )
        batch = _sent(publisher, records, decoded, _scores(values))
        assert _settle(batch) == []
        assert batch.outputs.n_alerts == 3
        sent[fmt] = producer
    per_record = [value for _, value, _, _ in sent["record"].on("alerts")]
    ((_, value, key, headers),) = sent["batch"].on("alerts")
    assert key == b"images/0/0-5" and headers == [("vaewatch.format", b"jsonl")]
    assert output_values(value, headers) == per_record
    assert [_strict(line)["offset"] for line in per_record] == [0, 2, 5]
    assert sent["batch"].on("scores") == sent["record"].on("scores")  # one per record
    assert len(sent["batch"].on("scores")) == (6 if scores_topic else 0)


def test_a_message_without_the_frame_header_is_one_object() -> None:
    line = b'{"offset": 1}'
    assert output_values(line, None) == [line]
    assert output_values(line, [("id", b"x")]) == [line]
    assert output_values(line + b"\n" + line, [("vaewatch.format", b"jsonl")]) == [line, line]
    assert output_values(None, None) == []
