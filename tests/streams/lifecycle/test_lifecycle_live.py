"""The model's lifecycle in a running worker, against the real embedded broker and real
Fashion-MNIST: a symlink flipped mid-stream (nothing lost, one version per record, each score
equal to that version's offline score; the image codec reading files as the new bundle's
preprocessing says), a corrupt candidate (the old model keeps serving), a
shadow candidate (both versions' anomaly rates), and drift (another class moves the KS
distance and the alert rule fires in promtool on the observed values; the calibrated class
does not)."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector import Detector, load_bundle, save_bundle
from detector.bundle import WEIGHTS
from detector.preprocess import ImageDecoding, preprocess_image
from streams.codec import encode_images
from tests.fixtures_broker import make_topics, start_worker
from tests.fixtures_model import CPU, SMALL_BUNDLE_NORMAL_CLASS, FashionMNIST
from tests.streams.kafka_helpers import produce_values, read_json, read_topic
from trainer.calibrate import calibrate_threshold
from vaewatch.cli import build_parser

pytestmark = pytest.mark.slow

STARTUP_S = 90  # a cold worker loads torch and the model; slow on a busy 2-core machine
RULES_DIR = Path(__file__).resolve().parents[3] / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def bundles(trained_bundle: Path, fashion_mnist: FashionMNIST, tmp_path_factory) -> dict:
    """v1: the trained bundle. v2: its weights nudged by 5 % (seeded) and recalibrated on real
    normal images, so its scores and threshold differ. corrupt: v2 with one weight byte
    flipped (its digest no longer matches)."""
    folder = tmp_path_factory.mktemp("lifecycle")
    bundle = load_bundle(trained_bundle)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in bundle.model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.mul_(1.0 + 0.05 * noise)
    test = fashion_mnist.test
    normal = test.images[test.labels == SMALL_BUNDLE_NORMAL_CLASS][:500]
    scores = Detector.from_bundle(bundle, CPU).score(normal)
    calibration = calibrate_threshold(scores.scores, target_fpr=bundle.calibration.target_fpr)
    v2 = folder / "v2"
    save_bundle(v2, model=bundle.model, calibration=calibration, metadata=bundle.metadata)
    corrupt = folder / "corrupt"
    shutil.copytree(v2, corrupt)
    data = bytearray((corrupt / WEIGHTS).read_bytes())
    data[-7] ^= 0xFF
    (corrupt / WEIGHTS).write_bytes(bytes(data))
    return {"v1": trained_bundle, "v2": v2, "corrupt": corrupt}


def _flip(link: Path, target: Path) -> None:
    staging = link.with_name(link.name + ".tmp")
    staging.unlink(missing_ok=True)
    staging.symlink_to(target)
    staging.replace(link)


def _metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (labels in any order)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if line.split("{")[0].split(" ")[0] == name and all(
            found.get(k) == v for k, v in labels.items()
        ):
            return float(line.rsplit(" ", 1)[1])
    return None


def _wait(
    what: str, probe: Callable[[], object], timeout_s: float = 30.0, worker: object = None
) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.1)
    log = worker.log()[-3000:] if worker is not None else ""  # type: ignore[attr-defined]
    raise AssertionError(f"timed out waiting for {what}; worker log:\n{log}")


def _lifecycle_args(**settings: object) -> list[str]:
    args: list[str] = []
    for key, value in settings.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def test_swap_mid_stream_and_a_corrupt_candidate(
    kafka_broker, bundles: dict, fashion_mnist: FashionMNIST, tmp_path: Path
) -> None:
    topics = make_topics(kafka_broker, partitions=2)
    link = tmp_path / "current"
    _flip(link, bundles["v1"])
    images = fashion_mnist.test.images  # record i carries image i % 10,000
    values = encode_images(images, codec="raw")
    worker = start_worker(
        model=link,
        topics=topics,
        log_dir=tmp_path,
        timeout_s=STARTUP_S,
        extra_args=[
            *_lifecycle_args(
                **{
                    "lifecycle.watch_interval_s": 0.1,
                    "lifecycle.admin_reload": True,
                    "stream.max_batch_size": 64,
                }
            )
        ],
    )
    detectors = {name: Detector.from_bundle(bundles[name], CPU) for name in ("v1", "v2")}
    versions = {detectors[name].version: name for name in detectors}
    try:
        # A corrupt candidate: the old model keeps serving the next 500 records.
        _flip(link, bundles["corrupt"])
        _wait(
            "the failed reload",
            lambda: _metric(
                worker.metrics_text(), "vaewatch_model_reloads_total", outcome="failed"
            ),
            worker=worker,
        )
        produce_values(topics.config, values[:500], partitions=2)
        read_topic(topics.config, topics.config.scores_topic, until=500)

        # A swap while records stream in at about 500/s: the link is flipped to v2 after a
        # few hundred, and records keep coming until a second after the worker swapped (the
        # load runs in the background meanwhile, seconds on a busy machine).
        swapped = threading.Event()
        sent = [500]

        def produce_rest() -> None:
            after = 0
            while sent[0] < 20_000 and after < 10:
                chunk = [values[i % len(values)] for i in range(sent[0], sent[0] + 50)]
                produce_values(topics.config, chunk, partitions=2)
                sent[0] += 50
                after += swapped.is_set()
                time.sleep(0.1)

        producer = threading.Thread(target=produce_rest)
        producer.start()
        time.sleep(0.4)
        _flip(link, bundles["v2"])
        try:
            _wait(
                "the swap",
                lambda: _metric(worker.metrics_text(), "vaewatch_model_swaps_total"),
                timeout_s=60,
                worker=worker,
            )
        finally:
            swapped.set()
            producer.join()
        total = sent[0]
        records = read_json(read_topic(topics.config, topics.config.scores_topic, until=total))
        text = worker.metrics_text()

        reply = urllib.request.urlopen(
            urllib.request.Request(f"{worker.url}/admin/reload", method="POST"), timeout=30
        )
        answer = json.loads(reply.read())
        worker.process.send_signal(signal.SIGHUP)
        _wait(
            "the SIGHUP reload",
            lambda: (
                _metric(worker.metrics_text(), "vaewatch_model_reloads_total", outcome="unchanged")
                == 2
            ),
            worker=worker,
        )
    finally:
        assert worker.stop() == 0
    log = worker.log()

    # Every record scored, each by exactly one version (duplicates, if any, agree).
    by_key: dict[tuple[int, int], set[str]] = {}
    for record in records:
        by_key.setdefault((record["partition"], record["offset"]), set()).add(
            record["model_version"]
        )
    assert set(by_key) == {(i % 2, i // 2) for i in range(total)}
    assert all(len(v) == 1 for v in by_key.values())
    version_of = {key: next(iter(v)) for key, v in by_key.items()}
    assert set(version_of.values()) == set(versions), "no swap happened mid-stream"
    # Per partition, v1 up to one offset and v2 from the next on: one swap, between batches.
    for partition in (0, 1):
        sequence = [versions[version_of[(partition, o)]] for o in range(total // 2)]
        switch = sequence.index("v2")
        assert switch >= 250  # the 500 records after the corrupt flip are all v1's
        assert sequence == ["v1"] * switch + ["v2"] * (total // 2 - switch)

    # Each streamed score is its version's offline score, and closer to it than to the other
    # version's (which is clearly different for almost every image).
    offline = {name: d.score(images) for name, d in detectors.items()}
    told_apart = 0
    for record in records:
        i = (record["offset"] * 2 + record["partition"]) % len(images)
        mine = versions[record["model_version"]]
        other = "v2" if mine == "v1" else "v1"
        own, others = float(offline[mine].scores[i]), float(offline[other].scores[i])
        assert record["score"] == pytest.approx(own, rel=1e-4, abs=1e-3)
        assert abs(record["score"] - own) <= abs(record["score"] - others)
        told_apart += record["score"] != pytest.approx(others, rel=1e-4, abs=1e-3)
        assert record["anomaly"] == bool(offline[mine].anomalous[i])
        assert record["threshold"] == pytest.approx(detectors[mine].threshold)
    assert told_apart >= 0.95 * len(records)

    v2 = detectors["v2"]
    assert _metric(text, "vaewatch_model_swaps_total") == 1
    assert _metric(text, "vaewatch_model_info", version=v2.version) == 1
    assert _metric(text, "vaewatch_model_info", version=detectors["v1"].version) is None
    assert _metric(text, "vaewatch_threshold") == pytest.approx(v2.threshold)
    assert _metric(text, "vaewatch_model_reloads_total", outcome="failed") == 1
    assert _metric(text, "vaewatch_model_reload_last_success") == 1
    assert _metric(text, "vaewatch_errors_total", kind="model") == 1
    assert answer["outcome"] == "unchanged" and answer["version"] == v2.version
    failures = [line for line in log.splitlines() if "keeps serving" in line]
    assert len(failures) == 1 and "digest" in failures[0]


def test_shadow_reports_both_versions_anomaly_rates(
    kafka_broker, bundles: dict, fashion_mnist: FashionMNIST, tmp_path: Path
) -> None:
    topics = make_topics(kafka_broker)
    shadow_topic = f"{topics.config.input_topic}.shadow"
    images = fashion_mnist.test.images[:1000]
    produce_values(topics.config, encode_images(images, codec="raw"))
    worker = start_worker(
        model=bundles["v1"],
        topics=topics,
        log_dir=tmp_path,
        timeout_s=STARTUP_S,
        extra_args=_lifecycle_args(
            **{"lifecycle.shadow_model": str(bundles["v2"]), "lifecycle.shadow_topic": shadow_topic}
        ),
    )
    try:
        alerts = read_json(read_topic(topics.config, topics.config.scores_topic, until=1000))
        shadow = read_json(read_topic(topics.config, shadow_topic, until=1000))
        v1, v2 = (Detector.from_bundle(bundles[n], CPU) for n in ("v1", "v2"))
        _wait(
            "the shadow's counts",
            lambda: (
                sum(
                    _metric(
                        worker.metrics_text(),
                        "vaewatch_model_records_total",
                        role="shadow",
                        version=v2.version,
                        outcome=o,
                    )
                    or 0
                    for o in ("normal", "anomaly")
                )
                == 1000
            ),
        )
        text = worker.metrics_text()
    finally:
        assert worker.stop() == 0
    first, second = v1.score(images), v2.score(images)
    assert {a["model_version"] for a in alerts} == {v1.version}  # the shadow changes nothing
    count = lambda role, v, o: _metric(  # noqa: E731
        text, "vaewatch_model_records_total", role=role, version=v, outcome=o
    )
    assert count("serving", v1.version, "anomaly") == first.anomalous.sum()
    assert count("shadow", v2.version, "anomaly") == second.anomalous.sum()
    disagreements = int((first.anomalous != second.anomalous).sum())
    assert _metric(text, "vaewatch_shadow_disagreements_total", version=v2.version) == disagreements
    assert _metric(text, "vaewatch_window_records", role="shadow") == 1000
    by_position = {r["offset"]: r for r in shadow}
    assert set(by_position) == set(range(1000))
    for offset, record in by_position.items():
        assert record["model_version"] == v2.version
        assert record["serving_model_version"] == v1.version
        assert record["anomaly"] == bool(second.anomalous[offset])
        assert record["serving_anomaly"] == bool(first.anomalous[offset])


def _promtool_fires(values: dict[str, float], tmp_path: Path) -> bool:
    """Whether VaewatchScoreDrift fires on 15 minutes of these drift gauges (rules.yml)."""
    rules = RULES_DIR / "rules.yml"
    assert rules.is_file(), rules  # promtool passes a test whose rule file glob is empty
    series = [
        {
            "series": f'{name}{{job="vaewatch",instance="w1:9108",role="serving"}}',
            "values": f"{value!r}x15",
        }
        for name, value in values.items()
    ]
    case = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "14m", "alertname": "VaewatchScoreDrift", "exp_alerts": []}
                ],
            }
        ],
    }
    path = tmp_path / "observed_test.yml"
    path.write_text(json.dumps(case))  # JSON is YAML
    result = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 or "VaewatchScoreDrift" in output, output
    return result.returncode != 0  # "expected no alerts" failed: it fired


def test_another_class_as_normal_traffic_moves_the_drift_statistic(
    kafka_broker, bundles: dict, fashion_mnist: FashionMNIST, tmp_path: Path
) -> None:
    if shutil.which("promtool") is None:
        pytest.fail("promtool not found: install Debian's `prometheus` package")
    topics = make_topics(kafka_broker)
    test = fashion_mnist.test
    normal = test.images[test.labels == SMALL_BUNDLE_NORMAL_CLASS][:600]
    trousers = test.images[test.labels == 1][:600]
    worker = start_worker(
        model=bundles["v1"],
        topics=topics,
        log_dir=tmp_path,
        timeout_s=STARTUP_S,
        extra_args=_lifecycle_args(
            **{"lifecycle.drift_window_records": 500, "lifecycle.drift_interval_s": 0.0}
        ),
    )
    names = ("vaewatch_drift_ks_statistic", "vaewatch_drift_ks_p_value", "vaewatch_window_records")
    try:
        produce_values(topics.config, encode_images(normal, codec="raw"))
        read_topic(topics.config, topics.config.scores_topic, until=600)
        text = worker.metrics_text()
        calm = {n: _metric(text, n, role="serving") for n in names}
        produce_values(topics.config, encode_images(trousers, codec="raw"))
        read_topic(topics.config, topics.config.scores_topic, until=1200)
        text = worker.metrics_text()
        moved = {n: _metric(text, n, role="serving") for n in names}
        # POST /admin/reload is off unless lifecycle.admin_reload is set.
        request = urllib.request.Request(f"{worker.url}/admin/reload", method="POST")
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=10)
        assert raised.value.code == 404
    finally:
        assert worker.stop() == 0
    assert calm["vaewatch_window_records"] == moved["vaewatch_window_records"] == 500
    assert calm["vaewatch_drift_ks_statistic"] < 0.1 and calm["vaewatch_drift_ks_p_value"] > 1e-3
    assert moved["vaewatch_drift_ks_statistic"] > 0.5 and moved["vaewatch_drift_ks_p_value"] < 1e-9
    assert not _promtool_fires(calm, tmp_path)
    assert _promtool_fires(moved, tmp_path)


def test_the_image_codec_follows_the_preprocessing_of_the_bundle_swapped_in(
    kafka_broker, trained_bundle: Path, fashion_mnist, tmp_path: Path
) -> None:
    """The image codec applies the serving bundle's preprocessing: a bundle without one (28 x 28
    files only) dead-letters a 64 x 64 JPEG, and once the worker has swapped to a bundle that
    records one, the same file is scored as that bundle scores it offline."""
    bundle = load_bundle(trained_bundle)
    legacy = tmp_path / "legacy"
    save_bundle(legacy, model=bundle.model, calibration=bundle.calibration)
    link = tmp_path / "current"
    _flip(link, legacy)
    buffer = io.BytesIO()
    image = fashion_mnist.test.images[0].reshape(28, 28)
    Image.fromarray(image).resize((64, 64)).save(buffer, format="JPEG", quality=90)
    photo = buffer.getvalue()

    topics = make_topics(kafka_broker, codec="image")
    worker = start_worker(
        model=link,
        topics=topics,
        log_dir=tmp_path,
        timeout_s=STARTUP_S,
        extra_args=["--set", "lifecycle.watch_interval_s=0.1"],
    )
    try:
        produce_values(topics.config, [photo])
        (dead,) = read_topic(topics.config, topics.config.dlq_topic, until=1)
        assert dict(dead.headers)["vaewatch.error"] == b"wrong_size"
        _flip(link, trained_bundle)
        deadline = time.monotonic() + 60
        while "vaewatch_model_swaps_total 1.0" not in worker.metrics_text():
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.1)
        produce_values(topics.config, [photo])
        (scored,) = read_topic(topics.config, topics.config.scores_topic, until=1)
    finally:
        assert worker.stop() == 0
    result = json.loads(scored.value)
    detector = Detector.from_bundle(trained_bundle, CPU)
    assert result["offset"] == 1 and result["model_version"] == detector.version
    offline = detector.score(preprocess_image(photo, ImageDecoding(detector.preprocessing))[None])
    assert result["score"] == pytest.approx(float(offline.scores[0]), rel=1e-5)
    assert not np.isnan(result["score"])


def test_worker_accepts_a_shadow_bundle_on_the_command_line() -> None:
    args = build_parser().parse_args(["worker", "--model", "m", "--shadow", "candidate"])
    assert str(args.shadow) == "candidate"
