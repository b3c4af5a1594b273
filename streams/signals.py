"""Stopping on SIGTERM and SIGINT: the first signal asks for a clean finish; for the worker, a
second one exits at once."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)


@contextmanager
def stop_on_signals(*, second_exits: bool = False) -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT, so a loop can finish its work and exit cleanly. With
    `second_exits` (the worker), a second signal exits at once (status 128 + signal): what was
    not committed by then is consumed again after a restart, so only the drain is cut short."""
    stop = threading.Event()

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set() and second_exits:
            logger.warning("signal %d again: exiting now, without draining", signum)
            logging.shutdown()
            os._exit(128 + signum)
        logger.info("signal %d: draining and stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
