"""CPU scoring in a child process, so that torch never waits for the GIL.

kafka-python 3 runs its network loop in a background thread; in one process every torch op
releases the GIL and then queues behind that thread to take it back, and kafka-python's
pure-Python record unpacking and torch's forward pass cannot run at the same time. A child
process owns its own GIL: the worker's process consumes, decodes and publishes while the child
scores, and the two use two cores.

Images go to the child and scores come back through shared memory (one slot per batch in
flight); only the model (once, at start), (slot, count) and (slot, seconds, error) cross the
pipe. The child is started with `spawn` (forking a process that already runs kafka-python's
threads and torch's thread pool is unsafe), ignores SIGINT and SIGTERM so that a worker
draining on a signal can still score the batch in hand, and exits when the pipe closes,
including when the worker dies.

This module imports neither Kafka nor the worker, so the child loads only torch and the model.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from detector import VAE
from detector.config import IMAGE_PIXELS
from detector.scorer import as_image_batch, score_batches

logger = logging.getLogger(__name__)

_SLOTS = 2  # one batch being scored while the next is copied in
_HELPER_JOIN_S = 5.0  # a helper thread's end once its child is gone: at once, bounded anyway


class ScoringProcessError(RuntimeError):
    """The scoring process did not start or could not score a batch."""


class ScoringProcessDiedError(ScoringProcessError):
    """The scoring process died (or was replaced) before it returned a batch's scores."""


class ScoringProcessTimeoutError(ScoringProcessDiedError):
    """The scoring process did not answer in time (hung, stopped, starved): treated as dead."""


def _serve(
    conn: Connection,
    inputs: Any,
    outputs: Any,
    capacity: int,
    cpu_threads: int,
    precision: str,
    int8_ranges: dict | None = None,
) -> None:
    """The child's loop: (slot, n) in, scores of inputs[slot, :n] into outputs[slot, :n], in
    the worker's detector's `precision` (int8 with its calibration's `int8_ranges`, so both
    scoring paths agree). The model's config and weights come first, through the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        config, state = conn.recv()
    except (EOFError, OSError):  # the worker closed the pipe before it sent the model
        os._exit(0)
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    model = VAE(config)
    model.load_state_dict({name: torch.from_numpy(array) for name, array in state.items()})
    model.eval()
    images = np.frombuffer(inputs, dtype=np.uint8).reshape(_SLOTS, capacity, IMAGE_PIXELS)
    scores = np.frombuffer(outputs, dtype=np.float32).reshape(_SLOTS, capacity)
    device = torch.device("cpu")
    try:
        conn.send("ready")
    except OSError:  # closed by the worker while the model loaded
        os._exit(0)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the worker closed the pipe or died
            request = None
        if request is None:
            # Nothing to flush or save: skip the interpreter's teardown of torch, which takes
            # seconds on a loaded machine and would count against the worker's shutdown.
            os._exit(0)
        slot, n = request
        started = time.perf_counter()
        try:
            batch = torch.from_numpy(images[slot, :n])
            scores[slot, :n] = score_batches(
                model,
                batch,
                device=device,
                batch_size=n,
                precision=precision,
                int8_ranges=int8_ranges,
            ).numpy()
        except Exception as exc:  # reported to the worker, which dead-letters the batch
            conn.send((slot, 0.0, f"{type(exc).__name__}: {exc}"[:200]))
            continue
        conn.send((slot, time.perf_counter() - started, None))


@dataclass
class _Start:
    """One child's start-up, watched by a thread so that nobody blocks on it before use."""

    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    model_sent: threading.Event = field(default_factory=threading.Event)


class PendingProcessScores:
    """A batch handed to the scoring process; `result()` returns its raw scores."""

    def __init__(self, owner: ScoringProcess, slot: int, n: int, generation: int) -> None:
        self._owner = owner
        self.slot = slot
        self.n = n
        self.generation = generation
        # One batch may be ahead of it in the child: past this, done() says yes so that the
        # caller's result() finds out (and reports the timeout) instead of waiting forever.
        self.overdue_at = time.monotonic() + 2 * owner.timeout_s
        self.seconds: float | None = None  # set when the scores are in
        self.error: ScoringProcessError | None = None

    @property
    def finished(self) -> bool:
        return self.seconds is not None or self.error is not None

    def done(self) -> bool:
        return self._owner.collect(self, block=False) or time.monotonic() > self.overdue_at

    def result(self) -> tuple[np.ndarray, float]:
        """(scores, seconds the child spent scoring); raises ScoringProcessError."""
        self._owner.collect(self, block=True)
        if self.error is not None:
            raise self.error
        assert self.seconds is not None
        return self._owner.read(self), self.seconds


class ScoringProcess:
    """A child process scoring batches of at most `capacity` uint8 images with `model`."""

    def __init__(
        self,
        *,
        model: VAE,
        capacity: int,
        cpu_threads: int,
        precision: str = "fp32",
        int8_ranges: dict | None = None,
        timeout_s: float = 30.0,
        start_timeout_s: float = 120.0,
    ) -> None:
        self._ctx = mp.get_context("spawn")
        self._config = model.config
        self._state = {
            name: tensor.detach().cpu().numpy().copy()
            for name, tensor in model.state_dict().items()
        }
        self.capacity = capacity
        self._cpu_threads = cpu_threads
        self._precision = precision
        self._int8_ranges = int8_ranges
        self._start_timeout_s = start_timeout_s
        self.timeout_s = timeout_s  # longest wait for one reply of a started child
        self._inputs = self._ctx.RawArray(ctypes.c_uint8, _SLOTS * capacity * IMAGE_PIXELS)
        self._outputs = self._ctx.RawArray(ctypes.c_float, _SLOTS * capacity)
        self._images = np.frombuffer(self._inputs, dtype=np.uint8).reshape(
            _SLOTS, capacity, IMAGE_PIXELS
        )
        self._scores = np.frombuffer(self._outputs, dtype=np.float32).reshape(_SLOTS, capacity)
        self._busy: list[PendingProcessScores | None] = [None] * _SLOTS
        self._next_slot = 0
        self.generation = 0
        self._start = _Start()
        self._process: Any = None
        self._helpers: list[threading.Thread] = []
        self._conn: Connection | None = None
        self.start()

    def start(self) -> None:
        """Start a child (without waiting for it to load the model)."""
        parent, child = self._ctx.Pipe()
        self._process = self._ctx.Process(
            target=_serve,
            args=(
                child,
                self._inputs,
                self._outputs,
                self.capacity,
                self._cpu_threads,
                self._precision,
                self._int8_ranges,
            ),
            name="vaewatch-scorer",
            daemon=True,
        )
        self._process.start()
        child.close()
        self._conn = parent
        self.generation += 1
        self._busy = [None] * _SLOTS
        self._start = _Start()
        self._helpers = [
            threading.Thread(
                target=self._send_model,
                args=(parent, self._start),
                name="vaewatch-scorer-model",
                daemon=True,
            ),
            threading.Thread(
                target=self._await_ready,
                args=(parent, self._process, self._start),
                name="vaewatch-scorer-start",
                daemon=True,
            ),
        ]
        for helper in self._helpers:
            helper.start()

    def _send_model(self, conn: Connection, start: _Start) -> None:
        # Through the pipe after the start rather than as Process arguments: spawn writes those
        # into a pipe that the child reads only once it has imported torch, so a model larger
        # than the pipe's buffer held up Process.start() for the whole import (1.2 s here), and
        # a starting worker connected to Kafka only after it instead of meanwhile.
        try:
            conn.send((self._config, self._state))
        except OSError:  # the child died, or the worker closed the pipe: _await_ready reports it
            return
        start.model_sent.set()

    def _await_ready(self, conn: Connection, process: Any, start: _Start) -> None:
        try:
            if not conn.poll(self._start_timeout_s):
                start.error = f"did not load the model in {self._start_timeout_s:.0f} s"
            elif (message := conn.recv()) != "ready":
                start.error = f"sent {message!r} instead of ready"
        except (EOFError, OSError):
            # No join here: two threads reaping one child race (one gets ECHILD and the
            # Process object then reads as alive); wait_ready() adds the exit code.
            start.error = "exited at start"
        start.done.set()
        if start.error is None:
            logger.info("scoring process %s ready", process.pid)
        else:
            logger.error("scoring process %s %s", process.pid, start.error)

    def restart(self) -> None:
        logger.error("restarting the scoring process (pid %s)", self._process.pid)
        self._stop(timeout_s=1.0)
        self.start()

    def ready(self) -> bool:
        """Whether the child has loaded the model (safe to call from any thread)."""
        return self._start.done.is_set() and self._start.error is None

    def wait_ready(self) -> None:
        start = self._start
        start.done.wait()
        if start.error is not None:
            self._process.join(1.0)
            raise ScoringProcessError(
                f"scoring process {start.error} (exit code {self._process.exitcode})"
            )

    def submit(self, images: np.ndarray) -> PendingProcessScores:
        images = as_image_batch(images)
        n = len(images)
        if n > self.capacity:
            raise ValueError(f"batch of {n} images exceeds the scoring slots' {self.capacity}")
        self.wait_ready()
        slot = self._next_slot
        self._next_slot = (slot + 1) % _SLOTS
        earlier = self._busy[slot]
        if earlier is not None:  # the child may still read this slot: wait for its reply
            self.collect(earlier, block=True)
            if isinstance(earlier.error, ScoringProcessTimeoutError):
                raise earlier.error  # it may still read the slot: the caller restarts it
        self._images[slot, :n] = images
        pending = PendingProcessScores(self, slot, n, self.generation)
        self._busy[slot] = pending
        self._send((slot, n))
        return pending

    def _send(self, message: Any) -> None:
        assert self._conn is not None
        try:
            self._conn.send(message)
        except (OSError, ValueError) as exc:  # broken pipe: the reply will report the death
            logger.error("scoring process unreachable: %s", exc)

    def collect(self, pending: PendingProcessScores, *, block: bool) -> bool:
        """Read replies until `pending` has its own (they come in submission order). Blocking
        waits at most timeout_s for each reply; then the child counts as dead (the caller
        restarts it)."""
        if pending.finished:
            return True
        if pending.generation != self.generation:
            pending.error = ScoringProcessDiedError("scoring process replaced before it finished")
            return True
        assert self._conn is not None
        while not pending.finished:
            try:
                if not block and not self._conn.poll():
                    return False
                if block and not self._conn.poll(self.timeout_s):
                    self._fail_busy(
                        pending,
                        ScoringProcessTimeoutError(
                            f"scoring process {self._process.pid} did not answer in "
                            f"{self.timeout_s:g} s"
                        ),
                    )
                    return True
                slot, seconds, error = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._process.join(1.0)
                self._fail_busy(
                    pending,
                    ScoringProcessDiedError(
                        f"scoring process {self._process.pid} died "
                        f"({type(exc).__name__}, exit code {self._process.exitcode})"
                    ),
                )
                return True
            finished = self._busy[slot]
            self._busy[slot] = None
            if finished is not None:
                if error is None:
                    finished.seconds = seconds
                else:
                    finished.error = ScoringProcessError(f"scoring process: {error}")
        return True

    def _fail_busy(self, pending: PendingProcessScores, error: Exception) -> None:
        """Every batch the process holds, and the one awaited, ends with `error` (to be scored
        again by a restarted process)."""
        for busy in self._busy:
            if busy is not None and not busy.finished:
                busy.error = error
        pending.error = pending.error or error

    def read(self, pending: PendingProcessScores) -> np.ndarray:
        return self._scores[pending.slot, : pending.n].copy()

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def _stop(self, *, timeout_s: float) -> None:
        if self._process is not None:
            if self._start.model_sent.is_set():
                self._send(None)
            else:  # the model is still on its way: no second writer on the pipe, and a child
                self._process.kill()  # without its model holds nothing
            self._process.join(timeout_s)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()  # SIGKILL cannot be refused: this returns
        # The child is gone, so the helper threads' reads and writes on the pipe end (EOF, a
        # broken pipe); only then is it closed: closed under a write of the model, the write
        # went on without a handle (TypeError).
        for helper in self._helpers:
            helper.join(_HELPER_JOIN_S)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        self._stop(timeout_s=10.0)
