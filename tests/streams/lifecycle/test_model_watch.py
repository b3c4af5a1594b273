"""The reload machinery (streams/lifecycle/model_watch.py) on real bundles: a flipped `current`
symlink is loaded in the background and handed over; a corrupt or half-written bundle keeps the
old model serving, is counted and logged once, and is picked up when its files are complete."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from detector import Detector, load_bundle
from detector.bundle import MANIFEST, WEIGHTS
from streams.lifecycle.metrics import LifecycleMetrics
from streams.lifecycle.model_watch import ModelWatcher, bundle_identity
from tests.fixtures_model import CPU, SMALL_BUNDLE_NORMAL_CLASS, FashionMNIST
from trainer.recalibrate import recalibrate_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def second_bundle(
    trained_bundle: Path, fashion_mnist: FashionMNIST, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The same weights recalibrated on other normal images for a 5 % FPR: another version,
    whose verdicts differ from the first's."""
    test = fashion_mnist.test
    normal = test.images[test.labels == SMALL_BUNDLE_NORMAL_CLASS][:400]
    out = tmp_path_factory.mktemp("second") / "v2"
    recalibrate_bundle(trained_bundle, normal, out=out, source="test images 0-399", target_fpr=0.05)
    return out


def _flip(link: Path, target: Path) -> None:
    """Atomically point `link` at `target`, as deployments do (ln -sfn + mv -T)."""
    staging = link.with_name(link.name + ".tmp")
    staging.unlink(missing_ok=True)
    staging.symlink_to(target)
    staging.replace(link)


def _until(condition: Callable[[], object], timeout_s: float = 20.0) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def _loader(path: Path) -> Detector:
    return Detector.from_bundle(path, CPU)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def watch(registry: CollectorRegistry) -> Iterator[Callable[..., ModelWatcher]]:
    started: list[ModelWatcher] = []

    def make(path: Path, serving: str, **kwargs: object) -> ModelWatcher:
        watcher = ModelWatcher(
            path,
            load=_loader,
            serving_version=serving,
            metrics=LifecycleMetrics(registry=registry),
            interval_s=0.05,
            **kwargs,  # type: ignore[arg-type]
        ).start()
        started.append(watcher)
        return watcher

    yield make
    for watcher in started:
        watcher.close()


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_a_flipped_symlink_is_loaded_warmed_up_and_handed_over(
    trained_bundle: Path, second_bundle: Path, tmp_path: Path, registry, watch
) -> None:
    link = tmp_path / "current"
    _flip(link, trained_bundle)
    v1, v2 = load_bundle(trained_bundle).version, load_bundle(second_bundle).version
    sizes_asked: list[int] = []

    def sizes() -> list[int]:
        sizes_asked.append(1)
        return [3, 64]

    watcher = watch(link, v1, warmup_sizes=sizes)
    time.sleep(0.3)
    assert watcher.take() is None  # nothing changed: nothing loaded
    assert _sample(registry, "vaewatch_model_reloads_total", outcome="loaded") == 0

    _flip(link, second_bundle)
    candidate = _until(watcher.take)
    assert candidate.detector.version == v2
    assert Path(candidate.path) == second_bundle.resolve()
    assert candidate.reason == "model path changed"
    assert sizes_asked, "the candidate was not warmed up on the worker's batch sizes"
    assert watcher.take() is None  # handed over once
    watcher.swapped(candidate)
    assert _sample(registry, "vaewatch_model_swaps_total") == 1
    assert _sample(registry, "vaewatch_model_reloads_total", outcome="loaded") == 1
    assert _sample(registry, "vaewatch_model_reload_last_success") == 1

    # Asked to reload the same bundle again: nothing to swap.
    outcome = watcher.reload_and_wait("SIGHUP")
    assert outcome is not None and outcome.outcome == "unchanged" and outcome.version == v2
    assert watcher.take() is None
    assert _sample(registry, "vaewatch_model_reloads_total", outcome="unchanged") == 1


def test_a_corrupt_bundle_keeps_the_old_model_and_is_not_retried_until_it_changes(
    trained_bundle: Path, second_bundle: Path, tmp_path: Path, registry, watch, caplog
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(second_bundle, broken)
    weights = broken / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    link = tmp_path / "current"
    _flip(link, trained_bundle)
    errors: list[str] = []
    watcher = watch(
        link, load_bundle(trained_bundle).version, on_error=lambda k, e: errors.append(k)
    )

    with caplog.at_level(logging.ERROR, logger="streams.lifecycle.model_watch"):
        _flip(link, broken)
        _until(lambda: watcher.last is not None)
        time.sleep(0.4)  # several more polls: the same broken files are not tried again
    assert watcher.last.outcome == "failed"
    assert "do not match the digest" in watcher.last.error
    assert watcher.take() is None
    assert errors == ["model"]
    lines = [r.getMessage() for r in caplog.records if r.name == "streams.lifecycle.model_watch"]
    assert len(lines) == 1 and "keeps serving" in lines[0] and "\n" not in lines[0]
    assert _sample(registry, "vaewatch_model_reloads_total", outcome="failed") == 1
    assert _sample(registry, "vaewatch_model_reload_last_success") == 0

    # The deployment rolls forward to a good bundle: loaded, and the failure clears.
    _flip(link, second_bundle)
    assert _until(watcher.take).detector.version == load_bundle(second_bundle).version
    assert _sample(registry, "vaewatch_model_reload_last_success") == 1


def test_a_half_written_bundle_is_picked_up_once_its_manifest_lands(
    trained_bundle: Path, second_bundle: Path, tmp_path: Path, watch
) -> None:
    """A bundle written in place (not renamed into place): the weights are there before the
    manifest, which save_bundle writes last; the manifest's arrival is a change."""
    target = tmp_path / "v2"
    target.mkdir()
    for name in (WEIGHTS, "calibration.safetensors"):
        shutil.copy(second_bundle / name, target / name)
    link = tmp_path / "current"
    _flip(link, trained_bundle)
    watcher = watch(link, load_bundle(trained_bundle).version)
    _flip(link, target)
    _until(lambda: watcher.last is not None)
    assert watcher.last.outcome == "failed" and "missing" in watcher.last.error
    shutil.copy(second_bundle / MANIFEST, target / MANIFEST)
    assert _until(watcher.take).detector.version == load_bundle(second_bundle).version


def test_a_model_with_non_finite_scores_is_refused(
    trained_bundle: Path, second_bundle: Path, tmp_path: Path, watch
) -> None:
    def poisoned(path: Path) -> Detector:
        # The bundle's weights are poisoned before the detector is made from it, as a bad bundle
        # would arrive (a detector prepares its CPU scoring copy of the weights when it is made).
        bundle = load_bundle(path)
        for parameter in bundle.model.parameters():
            parameter.data.fill_(float("nan"))
        return Detector.from_bundle(bundle, CPU)

    link = tmp_path / "current"
    _flip(link, trained_bundle)
    watcher = ModelWatcher(
        link, load=poisoned, serving_version=load_bundle(trained_bundle).version, interval_s=0
    )
    _flip(link, second_bundle)
    outcome = watcher.reload_and_wait("POST /admin/reload")  # not started: runs here
    assert outcome is not None and outcome.outcome == "failed"
    assert "non-finite" in outcome.error
    assert watcher.take() is None


def test_identity_follows_the_link_and_the_manifest(trained_bundle: Path, tmp_path: Path) -> None:
    link = tmp_path / "current"
    _flip(link, trained_bundle)
    first = bundle_identity(link)
    assert first.resolved == str(trained_bundle.resolve()) and first.manifest is not None
    assert bundle_identity(link) == first
    assert bundle_identity(tmp_path / "nothing").manifest is None
    np.testing.assert_equal(bundle_identity(trained_bundle), first)


def test_lifecycle_counts_both_models_and_switches_gauges_at_the_swap(
    trained_bundle: Path, second_bundle: Path, fashion_mnist: FashionMNIST, registry
) -> None:
    """The hooks the worker loop calls: the shadow scores what the serving model scored, its
    verdicts are counted and compared; at a swap the threshold, the info and the per-version
    series follow the new model."""
    from streams.lifecycle.model_lifecycle import ModelLifecycle
    from streams.lifecycle.model_watch import Candidate
    from streams.worker.metrics import WorkerMetrics

    metrics = WorkerMetrics(registry=registry, score_buckets=(0.0, 1.0))
    lifecycle_metrics = LifecycleMetrics(registry=registry)
    serving, shadow = _loader(trained_bundle), _loader(second_bundle)
    lifecycle = ModelLifecycle(
        detector=serving,
        metrics=metrics,
        lifecycle_metrics=lifecycle_metrics,
        drift_window_records=500,
        drift_interval_s=0.0,
        shadow=shadow,
    )
    images = fashion_mnist.test.images[:600]  # all classes: both models flag some
    for part in np.array_split(images, 3):
        lifecycle.observe(part, serving.score(part))
    lifecycle.shadow.drain()
    served, shadowed = serving.score(images), shadow.score(images)

    def count(role: str, version: str, outcome: str) -> float | None:
        return _sample(
            registry, "vaewatch_model_records_total", role=role, version=version, outcome=outcome
        )

    assert count("serving", serving.version, "anomaly") == served.anomalous.sum()
    assert count("shadow", shadow.version, "anomaly") == shadowed.anomalous.sum()
    assert count("shadow", shadow.version, "normal") == (~shadowed.anomalous).sum()
    disagreements = int((served.anomalous != shadowed.anomalous).sum())
    assert disagreements > 0
    assert (
        _sample(registry, "vaewatch_shadow_disagreements_total", version=shadow.version)
        == disagreements
    )
    for role in ("serving", "shadow"):
        assert _sample(registry, "vaewatch_window_records", role=role) == 500
        assert 0 < _sample(registry, "vaewatch_drift_ks_statistic", role=role) <= 1
    assert (
        _sample(
            registry,
            "vaewatch_shadow_model_info",
            version=shadow.version,
            threshold=repr(float(shadow.threshold)),
        )
        == 1
    )

    lifecycle.swapped(Candidate(shadow, str(second_bundle), "test"))
    assert _sample(registry, "vaewatch_threshold") == shadow.threshold
    assert (
        _sample(
            registry,
            "vaewatch_model_info",
            version=shadow.version,
            device="cpu",
            calibration_method="conformal",
        )
        == 1
    )
    assert count("serving", serving.version, "anomaly") is None  # the old version's series went
    assert _sample(registry, "vaewatch_window_records", role="serving") == 500  # until next batch
    lifecycle.observe(images[:10], shadow.score(images[:10]))
    assert _sample(registry, "vaewatch_window_records", role="serving") == 10  # window restarted
    lifecycle.close()
    assert count("shadow", shadow.version, "anomaly") is None


def test_admin_reload_over_http_answers_the_outcome(
    trained_bundle: Path, second_bundle: Path, tmp_path: Path, registry
) -> None:
    """POST /admin/reload on a real metrics server: the outcome as JSON (unchanged, then
    loaded after a flip, failed for a corrupt bundle with status 500); GET is refused, and an
    unknown action is a 404."""
    import json
    import urllib.error
    import urllib.request

    from streams.lifecycle.model_lifecycle import ModelLifecycle
    from streams.worker.health import MetricsServer
    from streams.worker.metrics import WorkerMetrics

    link = tmp_path / "current"
    _flip(link, trained_bundle)
    metrics = WorkerMetrics(registry=registry, score_buckets=(0.0, 1.0))
    lifecycle_metrics = LifecycleMetrics(registry=registry)
    serving = _loader(trained_bundle)
    watcher = ModelWatcher(
        link, load=_loader, serving_version=serving.version, metrics=lifecycle_metrics,
        interval_s=0,
    ).start()  # fmt: skip
    lifecycle = ModelLifecycle(
        detector=serving,
        metrics=metrics,
        lifecycle_metrics=lifecycle_metrics,
        drift_window_records=100,
        drift_interval_s=1.0,
        watcher=watcher,
    )
    server = MetricsServer(
        host="127.0.0.1",
        port=0,
        registry=registry,
        readiness=lambda: (True, {}),
        admin=lifecycle.admin,
    ).start()
    url = f"http://127.0.0.1:{server.port}"

    def post(path: str) -> tuple[int, dict]:
        request = urllib.request.Request(url + path, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        assert post("/admin/reload")[1]["outcome"] == "unchanged"
        _flip(link, second_bundle)
        status, answer = post("/admin/reload")
        assert status == 200 and answer["outcome"] == "loaded"
        assert answer["version"] == load_bundle(second_bundle).version
        broken = tmp_path / "broken"
        shutil.copytree(second_bundle, broken)
        (broken / MANIFEST).write_text("{")
        _flip(link, broken)
        status, answer = post("/admin/reload")
        assert (
            status == 500 and answer["outcome"] == "failed" and "not valid JSON" in answer["error"]
        )
        assert post("/admin/other")[0] == 404
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(url + "/admin/reload", timeout=10)
        assert raised.value.code == 405
    finally:
        server.stop()
        lifecycle.close()
