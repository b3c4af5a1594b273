"""What the broker refuses a running worker, and one log line per cause.

kafka-python's consumer raises some refusals from poll() (a consumer group the worker may not
use: GroupAuthorizationFailedError, again at every poll) and only logs others (an input topic it
may not read: the group assigns it nothing, and the worker would look healthy while consuming
nothing). BrokerRefusals turns both into readiness (`authorized`) and into one line naming the
cause (streams.connection_errors), logged when it first appears, when it changes, and then at
most every `log_interval_s`; while the input topic is refused, it asks for fresh metadata every
`recheck_s`, so that an ACL granted meanwhile takes effect within seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kafka import KafkaConsumer
from kafka.errors import TopicAuthorizationFailedError

from streams.client_internals import request_metadata_update, unauthorized_topics
from streams.config import StreamConfig
from streams.connection_errors import describe_authorization_error, describe_kafka_error

logger = logging.getLogger(__name__)


class RepeatedErrorLog:
    """Logs a message the first time, when it changes, and then at most every `interval_s`
    (with how many times it came meanwhile), so a cause repeated at every poll is one line."""

    def __init__(
        self,
        log: logging.Logger,
        *,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._interval_s = interval_s
        self._clock = clock
        self._last: str | None = None
        self._logged_at = 0.0
        self._repeats = 0

    def report(self, message: str) -> None:
        now = self._clock()
        if message != self._last or now - self._logged_at >= self._interval_s:
            again = f" ({self._repeats} more times since)" if self._repeats else ""
            self._log.error("%s%s", message, again if message == self._last else "")
            self._last, self._logged_at, self._repeats = message, now, 0
        else:
            self._repeats += 1

    def clear(self, recovered: str) -> None:
        """The cause is gone: say so once (INFO), and log it again at once if it comes back."""
        if self._last is not None:
            self._log.info("%s", recovered)
            self._last, self._repeats = None, 0


class BrokerRefusals:
    def __init__(
        self,
        *,
        consumer: KafkaConsumer,
        config: StreamConfig,
        log_interval_s: float = 30.0,
        recheck_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._consumer = consumer
        self._config = config
        self._recheck_s = recheck_s
        self._clock = clock
        self._log = RepeatedErrorLog(logger, interval_s=log_interval_s, clock=clock)
        self._rechecked_at = clock()
        self.authorized = True

    def poll_failed(self, exc: BaseException) -> None:
        """An error poll() raised: logged in one line; an authorization error clears
        `authorized` until a poll goes through."""
        if describe_authorization_error(exc, self._config) is not None:
            self.authorized = False
        self._log.report(f"consumer: {describe_kafka_error(exc, self._config)}")

    def poll_succeeded(self) -> bool:
        """After a poll that raised nothing: whether the worker may read its input topic."""
        topic = self._config.input_topic
        if topic not in unauthorized_topics(self._consumer):
            if not self.authorized:
                self._log.clear(f"consumer: authorized again; consuming {topic}")
            self.authorized = True
            return True
        self.authorized = False
        refused = TopicAuthorizationFailedError({topic})
        why = describe_authorization_error(refused, self._config, operation="READ")
        self._log.report(f"input topic: {why}")
        now = self._clock()
        if now - self._rechecked_at >= self._recheck_s:
            self._rechecked_at = now
            request_metadata_update(self._consumer)
        return False
