"""The scoring process: same scores as the detector, survives being killed, refuses what it
cannot hold, ignores the signals that make the worker drain, and exits with it."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from detector import Detector
from streams.config import StreamConfig
from streams.worker.score_process import ScoringProcess
from streams.worker.scoring import ProcessScorer, build_scorer
from tests.fixtures_model import CPU


@pytest.fixture(scope="module")
def detector(trained_bundle) -> Detector:
    return Detector.from_bundle(trained_bundle, CPU)


@pytest.fixture
def scorer(detector):
    errors: list[str] = []
    scorer = build_scorer(
        StreamConfig(max_batch_size=256, scoring_timeout_s=3.0),
        detector=detector,
        on_error=lambda kind, exc: errors.append(kind),
    )
    assert isinstance(scorer, ProcessScorer)
    yield scorer, errors
    scorer.close()


def test_scores_equal_the_detectors_and_two_batches_can_be_in_flight(
    scorer, detector, fashion_mnist
) -> None:
    batch_scorer, _ = scorer
    first, second = fashion_mnist.test.images[:256], fashion_mnist.test.images[256:400]
    pending = [batch_scorer.submit(first), batch_scorer.submit(second)]
    assert batch_scorer.ready()
    results = [p.result() for p in pending]
    for images, result in zip((first, second), results, strict=True):
        offline = detector.score(images)
        np.testing.assert_allclose(result.scores, offline.scores, rtol=1e-6)
        np.testing.assert_array_equal(result.anomalous, offline.anomalous)
        np.testing.assert_array_equal(result.p_values, offline.p_values)
    assert np.count_nonzero(results[0].anomalous) + np.count_nonzero(results[1].anomalous) > 0


def test_a_killed_process_is_restarted_and_the_batch_scored_again(
    scorer, detector, fashion_mnist
) -> None:
    batch_scorer, errors = scorer
    images = fashion_mnist.test.images[:200]
    batch_scorer.submit(images).result()
    process = batch_scorer.process
    assert process is not None
    old_pid = process._process.pid
    os.kill(old_pid, signal.SIGKILL)
    process._process.join(10)
    result = batch_scorer.submit(images).result()
    np.testing.assert_allclose(result.scores, detector.score(images).scores, rtol=1e-6)
    assert process._process.pid != old_pid and process.alive()
    assert errors == ["scoring"]


def test_a_frozen_process_is_killed_after_the_timeout_and_the_batch_scored_again(
    scorer, detector, fashion_mnist
) -> None:
    batch_scorer, errors = scorer
    images = fashion_mnist.test.images[:100]
    batch_scorer.submit(images).result()
    process = batch_scorer.process
    frozen = process._process.pid
    os.kill(frozen, signal.SIGSTOP)
    try:
        pending = batch_scorer.submit(images)
        started = time.monotonic()
        assert not pending.done()
        result = pending.result()
        waited = time.monotonic() - started
    finally:
        if process._process.pid == frozen:
            os.kill(frozen, signal.SIGCONT)
    np.testing.assert_allclose(result.scores, detector.score(images).scores, rtol=1e-6)
    assert process._process.pid != frozen and errors == ["scoring"]
    assert waited >= 3.0  # the timeout, then a restart (model load) and the batch again


def test_the_process_ignores_sigint_and_sigterm_so_a_draining_worker_can_finish(
    scorer, fashion_mnist
) -> None:
    batch_scorer, _ = scorer
    images = fashion_mnist.test.images[:64]
    batch_scorer.submit(images).result()  # started and ready
    pid = batch_scorer.process._process.pid
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.2)
    assert batch_scorer.process.alive()
    assert len(batch_scorer.submit(images).result()) == 64
    assert batch_scorer.process._process.pid == pid


def test_a_batch_larger_than_a_slot_is_refused(detector) -> None:
    process = ScoringProcess(model=detector.model, capacity=8, cpu_threads=1)
    try:
        with pytest.raises(ValueError, match="exceeds"):
            process.submit(np.zeros((9, 784), np.uint8))
    finally:
        process.close()
    assert not process.alive()


def test_a_caught_up_batch_is_scored_in_the_worker_without_the_process(
    scorer, detector, fashion_mnist
) -> None:
    batch_scorer, _ = scorer
    images = fashion_mnist.test.images[:50]
    slot_before = batch_scorer.process._next_slot
    scoring = batch_scorer.submit(images, caught_up=True)
    assert scoring.done()  # scored already, here
    assert batch_scorer.process._next_slot == slot_before  # nothing handed to the child
    np.testing.assert_allclose(scoring.result().scores, detector.score(images).scores, rtol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_the_process_scores_in_the_detectors_precision(
    trained_bundle, fashion_mnist, precision: str
) -> None:
    """Batches scored in the child and caught-up batches scored in the worker agree: the child
    scores in the precision the detector resolved, not in fp32 whatever the setting (int8 with
    the bundle's activation ranges)."""
    detector = Detector.from_bundle(trained_bundle, CPU.model_copy(update={"precision": precision}))
    assert detector.precision == precision
    scorer = build_scorer(StreamConfig(max_batch_size=128), detector=detector)
    try:
        images = fashion_mnist.test.images[:128]
        in_child = scorer.submit(images).result().scores
        in_worker = scorer.submit(images, caught_up=True).result().scores
    finally:
        scorer.close()
    np.testing.assert_array_equal(in_child, in_worker)


_GATE_HOOK = """\
import os, sys, time
if "--multiprocessing-fork" in sys.argv:  # a spawned child: wait until the test opens the gate
    while not os.path.exists(os.environ["VAEWATCH_TEST_GATE"]):
        time.sleep(0.05)
"""


def test_starting_a_child_does_not_wait_for_its_start_up(detector, tmp_path, monkeypatch) -> None:
    """A starting worker connects to Kafka while its scoring child imports torch: the child's
    start-up is held at a gate (a sitecustomize hook in the child), and the start must return
    while the gate is still shut. It did not when the weights went as Process arguments: spawn
    writes those into a pipe the child reads only after its imports."""
    (tmp_path / "sitecustomize.py").write_text(_GATE_HOOK)
    gate = tmp_path / "open"
    monkeypatch.setenv("VAEWATCH_TEST_GATE", str(gate))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    started: list[ScoringProcess] = []
    starting = threading.Thread(
        target=lambda: started.append(
            ScoringProcess(model=detector.model, capacity=64, cpu_threads=1)
        ),
        daemon=True,
    )
    starting.start()
    starting.join(timeout=60)
    try:
        assert started, "ScoringProcess() waited for the child's start-up"
        assert not started[0].ready()
    finally:
        gate.touch()
        starting.join(timeout=60)
    child = started[0]
    try:
        child.wait_ready()
        assert child.ready()
    finally:
        child.close()


def test_a_process_closed_while_it_starts_stops_without_a_traceback(
    detector, tmp_path, monkeypatch
) -> None:
    """A worker stopped while its scoring child still starts (the issue-30 engineer's find):
    the model is still on its way through the pipe, whose buffer it overfills, when close()
    comes. close() closed the pipe under the thread that wrote the model, and that write went
    on without a handle: a TypeError traceback from _send_model. The child is held at the gate
    (as in the test above) so that close() always meets the model in transit."""
    (tmp_path / "sitecustomize.py").write_text(_GATE_HOOK)
    monkeypatch.setenv("VAEWATCH_TEST_GATE", str(tmp_path / "open"))  # never opened
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    weights = sum(t.numel() * t.element_size() for t in detector.model.state_dict().values())
    assert weights > 1 << 20  # far more than a pipe's buffer (64 KiB)
    failures: list[str] = []
    monkeypatch.setattr(
        threading, "excepthook", lambda args: failures.append(f"{args.thread}: {args.exc_value!r}")
    )
    process = ScoringProcess(model=detector.model, capacity=64, cpu_threads=1)
    assert not process.ready()
    process.close()
    assert not process.alive()
    for thread in threading.enumerate():
        if thread.name.startswith("vaewatch-scorer-"):
            thread.join(timeout=30)
            assert not thread.is_alive(), thread.name
    assert failures == []
