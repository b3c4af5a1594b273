"""The console's live alert view: follow the alert topic, read each alert's image back from
its source topic/partition/offset, explain it with the served model (saying whether that is the
model that raised the alert: after a worker's hot swap it may not be) and hand the card to the
hub, which fans it out to every open event stream (server-sent events).

The only part of serve/ that knows Kafka; it reuses streams/ for settings, consumers and record
decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, TopicAuthorizationFailedError, UnknownTopicOrPartitionError

from detector.preprocess import ImageDecoding
from streams.broker_refusals import RepeatedErrorLog
from streams.client_internals import unauthorized_topics
from streams.codec import decode_batch
from streams.config import StreamConfig
from streams.connection_errors import describe_kafka_error
from streams.kafka_io import create_consumer, topic_access_error
from streams.worker.publish import output_values

logger = logging.getLogger(__name__)

CLIENT_ID = "vaewatch-serve"  # tells the console's reads from the workers' in the broker's logs
_SOURCE_READ_TIMEOUT_S = 5.0
_SUBSCRIBER_BACKLOG = 100  # cards a slow viewer may fall behind before its oldest are skipped


class AlertHub:
    """Recent alert cards and the queues of the viewers following them (one event loop)."""

    def __init__(self, *, recent: int) -> None:
        self.recent: deque[dict[str, Any]] = deque(maxlen=max(recent, 1))
        self._subscribers: set[asyncio.Queue] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=_SUBSCRIBER_BACKLOG)
        for card in self.recent:
            queue.put_nowait(card)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    def _publish(self, card: dict[str, Any]) -> None:
        self.recent.append(card)
        for queue in self._subscribers:
            if queue.full():
                # A viewer that stopped reading: it loses its oldest card, the others nothing.
                queue.get_nowait()
                logger.warning("a live-alert viewer is %d cards behind", _SUBSCRIBER_BACKLOG)
            queue.put_nowait(card)

    def publish_threadsafe(self, card: dict[str, Any]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._publish, card)


def _consumer(stream: StreamConfig) -> KafkaConsumer:
    # Outside any group: the viewer reads, it never commits or takes partitions from the workers.
    return create_consumer(config=stream, grouped=False, client_id=CLIENT_ID)


class AlertFollower:
    """A daemon thread: alerts in, cards out. `explain(image 784 uint8, model_version=the
    alert's) -> dict` adds the served model's reconstruction and heatmap to a card, and which
    model drew them."""

    def __init__(
        self,
        *,
        stream: StreamConfig,
        hub: AlertHub,
        explain: Callable[..., dict[str, Any]],
        replay_recent: int,
        images: ImageDecoding | None = None,
    ) -> None:
        self.images = images  # the served bundle's preprocessing, for the image codec
        self.stream = stream
        self.hub = hub
        self.explain = explain
        self.replay_recent = replay_recent
        self.connected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        backoff = 0.5
        errors = RepeatedErrorLog(logger)
        while not self._stop.is_set():
            try:
                self._follow()
            except (KafkaError, OSError) as exc:
                self.connected = False
                # One line naming the cause (a refused password or certificate, a missing
                # ACL), repeated at most every 30 s while it lasts.
                errors.report(f"live alerts: {describe_kafka_error(exc, self.stream)}; retrying")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _assign_alert_topic(self, consumer: KafkaConsumer) -> None:
        """Assign every partition of the alert topic; raises the reason there are none (the
        topic does not exist yet, or no ACL lets this client read it)."""
        topic = self.stream.alert_topic
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise topic_access_error(self.stream, topic) or UnknownTopicOrPartitionError(topic)
        parts = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(parts)
        ends = consumer.end_offsets(parts)
        starts = consumer.beginning_offsets(parts)
        for tp in parts:
            # Replay the last few alerts (shared out over the partitions) to a fresh console.
            back = self.replay_recent // max(len(parts), 1)
            consumer.seek(tp, max(starts[tp], ends[tp] - back))

    def _follow(self) -> None:
        with contextlib.ExitStack() as clients:  # both closed, whichever fails to connect
            alerts = _consumer(self.stream)
            clients.callback(alerts.close)
            sources = _consumer(self.stream)
            clients.callback(sources.close)
            self._follow_with(alerts, sources)

    def _follow_with(self, alerts: KafkaConsumer, sources: KafkaConsumer) -> None:
        self._assign_alert_topic(alerts)
        self.connected = True
        logger.info("live alerts: following %s", self.stream.alert_topic)
        while not self._stop.is_set():
            values = [
                value
                for batch in alerts.poll(timeout_ms=200).values()
                for record in batch
                for value in output_values(record.value, record.headers)  # frames too
            ]
            # A viewer wants the newest alerts: when a burst brings more than the view
            # holds, the older ones are not read back (they stay on the alert topic).
            skipped = max(len(values) - self.replay_recent, 0)
            if skipped:
                logger.info("live alerts: %d older alerts of a burst not shown", skipped)
            for value in values[skipped:]:
                try:
                    self._handle(value, sources)
                except (KafkaError, OSError):
                    raise  # _run reconnects
                except Exception:  # one odd alert must not end the view for good
                    logger.exception("live alerts: an alert could not be shown; skipped")

    def _handle(self, value: bytes, sources: KafkaConsumer) -> None:
        try:
            alert = json.loads(value)
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("live alerts: an alert that is not JSON was skipped")
            return
        if not isinstance(alert, dict):
            return
        card: dict[str, Any] = {
            key: alert.get(key)
            for key in (
                "topic", "partition", "offset", "key", "id", "score", "p_value", "threshold",
                "model_version", "timestamp_ms", "scored_at_ms",
            )
        }  # fmt: skip
        image, problem = self._read_source(alert, sources)
        if image is None:
            card["image_error"] = problem
        else:
            version = alert.get("model_version")
            card.update(
                self.explain(image, model_version=None if version is None else str(version))
            )
        self.hub.publish_threadsafe(card)

    def _read_source(
        self, alert: dict[str, Any], sources: KafkaConsumer
    ) -> tuple[np.ndarray | None, str]:
        try:
            tp = TopicPartition(str(alert["topic"]), int(alert["partition"]))
            offset = int(alert["offset"])
        except (KeyError, TypeError, ValueError):
            return None, "the alert names no topic, partition and offset"
        sources.assign([tp])
        sources.seek(tp, offset)
        deadline = time.monotonic() + _SOURCE_READ_TIMEOUT_S
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                polled = sources.poll(timeout_ms=200, max_records=1)
                if tp.topic in unauthorized_topics(sources):  # poll() only logs it
                    raise TopicAuthorizationFailedError({tp.topic})
            except KafkaError as exc:  # a source topic this client may not read
                why = describe_kafka_error(exc, self.stream, operation="READ")
                return None, f"cannot read it back: {why}"
            for record in polled.get(tp, []):
                if record.offset != offset:
                    return None, f"{tp.topic}/{tp.partition}/{offset} is gone (retention)"
                decoded = decode_batch([record.value], codec=self.stream.codec, images=self.images)
                if decoded.n_valid != 1:
                    reason = next(iter(decoded.errors.values()), ("undecodable", ""))[0]
                    return None, f"the source record does not decode ({reason})"
                return decoded.images[0], ""
        return None, f"{tp.topic}/{tp.partition}/{offset} could not be read back in time"
