"""Hot reload: watch the worker's model path, load and verify a new bundle in the background,
and hand it over to be swapped in between two batches.

The path is a bundle directory or a symlink to one; deployments write the new bundle next to the
old and flip a `current` link atomically (`ln -sfn v2 current.tmp && mv -T current.tmp current`).
A change is the link pointing elsewhere or the manifest being rewritten (save_bundle writes it
last). Besides polling, a reload can be asked for (SIGHUP, POST /admin/reload). Loading, digest
verification and a warm-up on the worker's real batch sizes run in this module's thread, so the
worker keeps scoring with the old model meanwhile; it only picks the ready model up between
batches (`take`). A bundle that fails leaves the old model serving: one log line says why, the
failure is counted, and the same files are not retried until they change or a reload is asked.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector import Detector
from detector.bundle import MANIFEST
from detector.config import IMAGE_PIXELS
from streams.lifecycle.metrics import LifecycleMetrics

logger = logging.getLogger(__name__)

LoadDetector = Callable[[Path], Detector]
ErrorCallback = Callable[[str, BaseException], None]
# What else a model needs before it can serve (e.g. a scoring process started with its weights),
# made in the watcher's thread; and how to release it when the candidate is never swapped in.
Prepare = Callable[[Detector], Any]
Dispose = Callable[[Any], None]


@dataclass(frozen=True)
class BundleIdentity:
    """What says the bundle at the model path changed: where the path leads, and the manifest
    file's inode, modification time and size."""

    resolved: str
    manifest: tuple[int, int, int] | None


def bundle_identity(path: str | Path) -> BundleIdentity:
    resolved = os.path.realpath(path)
    try:
        stat = os.stat(os.path.join(resolved, MANIFEST))
    except OSError:
        return BundleIdentity(resolved, None)
    return BundleIdentity(resolved, (stat.st_ino, stat.st_mtime_ns, stat.st_size))


@dataclass(frozen=True)
class ReloadOutcome:
    """The result of one reload attempt."""

    attempt: int
    outcome: str  # loaded, failed, unchanged
    reason: str  # what triggered it: "model path changed", "SIGHUP", "POST /admin/reload"
    path: str  # the bundle directory the model path led to
    version: str | None  # the loaded bundle's version (None when it failed)
    error: str | None  # one line, when it failed
    seconds: float  # load + verify + warm-up

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Candidate:
    """A loaded, verified, warmed-up model waiting to be swapped in."""

    detector: Detector
    path: str
    reason: str
    prepared: Any = None  # what `prepare` made for it


class ModelWatcher:
    """Polls `path` every `interval_s` (0: only on request) in a daemon thread."""

    def __init__(
        self,
        path: str | Path,
        *,
        load: LoadDetector,
        serving_version: str,
        metrics: LifecycleMetrics | None = None,
        on_error: ErrorCallback | None = None,
        interval_s: float = 1.0,
        warmup_sizes: Callable[[], Sequence[int]] = lambda: (1,),
        prepare: Prepare | None = None,
        dispose: Dispose | None = None,
    ) -> None:
        self._path = Path(path)
        self._load = load
        self._metrics = metrics
        self._on_error = on_error
        self._interval_s = interval_s
        self._warmup_sizes = warmup_sizes
        self._prepare = prepare
        self._dispose = dispose
        self._serving_version = serving_version
        self._seen = bundle_identity(self._path)
        # Plain attributes written by a signal handler or the HTTP thread and read by the
        # watcher's thread: no lock may be taken in a signal handler.
        self._requested: str | None = None
        self._ready: Candidate | None = None
        self._ready_lock = threading.Lock()
        self._stop = threading.Event()
        self._attempts = 0  # finished
        self._started = 0  # begun (one more than _attempts while one runs)
        self.last: ReloadOutcome | None = None
        self._thread = threading.Thread(target=self._run, name="model-watch", daemon=True)
        if metrics is not None:
            metrics.reload_last_timestamp.set(time.time())

    @property
    def path(self) -> Path:
        return self._path

    def start(self) -> ModelWatcher:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._discard(self.take())

    # -- requests (any thread, or a signal handler) ---------------------------------------

    def request(self, reason: str) -> None:
        """Ask for a reload of whatever the path leads to now, changed or not."""
        self._requested = reason

    def reload_and_wait(self, reason: str, *, timeout_s: float = 60.0) -> ReloadOutcome | None:
        """Ask for a reload and wait for its outcome (None: not done within `timeout_s`)."""
        # An attempt already under way may have read the files before this request: wait for
        # one that begins after it.
        wanted = self._started + 1
        self.request(reason)
        deadline = time.monotonic() + timeout_s
        while self._attempts < wanted and time.monotonic() < deadline:
            if not self._thread.is_alive():
                self._check()  # not started (tests, tools): do the work here
                break
            time.sleep(0.02)
        return self.last if self._attempts >= wanted else None

    # -- the worker's side ----------------------------------------------------------------

    def take(self) -> Candidate | None:
        """The model to swap in now, if one is ready; the caller swaps it between batches and
        calls `swapped`."""
        if self._ready is None:
            return None
        with self._ready_lock:
            candidate, self._ready = self._ready, None
        return candidate

    def swapped(self, candidate: Candidate) -> None:
        self._serving_version = candidate.detector.version
        if self._metrics is not None:
            self._metrics.swaps.inc()
        logger.info(
            "model %s (%s) now serves (%s)", candidate.detector.version, candidate.path,
            candidate.reason,
        )  # fmt: skip

    # -- the watcher's thread ---------------------------------------------------------------

    def _run(self) -> None:
        tick = min(self._interval_s, 0.1) if self._interval_s > 0 else 0.1
        next_poll = time.monotonic() + self._interval_s
        while not self._stop.wait(tick):
            if self._requested is None and (self._interval_s <= 0 or time.monotonic() < next_poll):
                continue
            next_poll = time.monotonic() + self._interval_s
            try:
                self._check()
            except Exception:  # the watcher must outlive any one bad bundle
                logger.exception("model watch: unexpected error")

    def _check(self) -> None:
        reason, self._requested = self._requested, None
        identity = bundle_identity(self._path)
        if reason is None:
            if identity == self._seen:
                return
            reason = "model path changed"
        self._seen = identity
        self._attempt(identity.resolved, reason)

    def _attempt(self, resolved: str, reason: str) -> None:
        self._started += 1
        started = time.perf_counter()
        version: str | None = None
        error: str | None = None
        try:
            detector = self._load(Path(resolved))
            version = detector.version
            if version == self._serving_version:
                outcome = "unchanged"
            else:
                self._warm_up(detector)
                prepared = self._prepare(detector) if self._prepare is not None else None
                candidate = Candidate(detector, resolved, reason, prepared)
                with self._ready_lock:
                    replaced, self._ready = self._ready, candidate
                self._discard(replaced)  # a newer bundle came before the worker took it
                outcome = "loaded"
        except Exception as exc:  # BundleError, DeviceError, a failed warm-up: keep serving
            outcome = "failed"
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            error = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            if self._on_error is not None:
                self._on_error("model", exc)
        seconds = time.perf_counter() - started
        self.last = ReloadOutcome(
            attempt=self._attempts + 1,
            outcome=outcome,
            reason=reason,
            path=resolved,
            version=version,
            error=error,
            seconds=seconds,
        )
        self._attempts += 1
        if self._metrics is not None:
            self._metrics.reloads.labels(outcome=outcome).inc()
            self._metrics.reload_last_success.set(0 if outcome == "failed" else 1)
            self._metrics.reload_last_timestamp.set(time.time())
        if outcome == "failed":
            logger.error(
                "reload (%s) of %s failed, model %s keeps serving: %s",
                reason, resolved, self._serving_version, error,
            )  # fmt: skip
        else:
            logger.info(
                "reload (%s) of %s: %s, version %s, %.2f s",
                reason, resolved, outcome, version, seconds,
            )  # fmt: skip

    def _discard(self, candidate: Candidate | None) -> None:
        if candidate is not None and candidate.prepared is not None and self._dispose is not None:
            self._dispose(candidate.prepared)

    def _warm_up(self, detector: Detector) -> None:
        """Score blank batches of the worker's batch sizes once (first-call allocations happen
        here, not in the first live batch) and check the model gives finite scores."""
        for size in sorted({max(1, int(s)) for s in self._warmup_sizes()}):
            scores = detector.score(np.zeros((size, IMAGE_PIXELS), dtype=np.uint8)).scores
            if not np.all(np.isfinite(scores)):
                raise ValueError(f"model {detector.version} gives non-finite scores")
