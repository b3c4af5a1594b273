"""The web console in a real browser: Debian's chromium, headless, driven by Playwright (its own
browser download is never used). Score and Generate views against the service; the Live alerts
view with the embedded broker and a real worker, after an anomaly is produced.

Screenshots go to the test's folder; with VAEWATCH_CONSOLE_SCREENSHOTS=DIR they are copied
there too (docs/img/ holds the committed ones)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from detector import Detector
from streams.kafka_io import create_producer
from tests.fixtures_broker import make_topics, start_worker
from tests.fixtures_model import CPU, SMALL_BUNDLE_NORMAL_CLASS
from tests.serve.http_helpers import png
from trainer.recalibrate import recalibrate_bundle

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed (make setup installs it)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors in the console: {errors}"


def _screenshot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path))
    target = os.environ.get("VAEWATCH_CONSOLE_SCREENSHOTS")
    if target:
        shutil.copy(path, Path(target) / name)


def _images_by_score(bundle: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lowest-scoring, highest-scoring) of `images` under the bundle's model."""
    scores = Detector.from_bundle(bundle, CPU).score(images).scores
    order = np.argsort(scores)
    return images[order[0]], images[order[-1]]


def test_score_and_generate_views(
    page: Any, service_url: str, trained_bundle: Path, fashion_mnist: Any, tmp_path: Path
) -> None:
    test = fashion_mnist.test
    normal, anomaly = _images_by_score(
        trained_bundle,
        np.concatenate([test.images[test.labels == 0][:20], test.images[test.labels == 7][:20]]),
    )
    # Files as a user has them: a 28 x 28 PNG, a 112 x 112 colour JPEG, a 16-bit TIFF (which
    # the browser cannot show, but the model can read).
    (tmp_path / "tshirt.png").write_bytes(png(normal))
    Image.fromarray(anomaly.reshape(28, 28)).resize((112, 112)).convert("RGB").save(
        tmp_path / "sneaker.jpg", quality=95
    )
    Image.fromarray(normal.reshape(28, 28).astype(np.uint16) * 257).save(tmp_path / "tshirt.tiff")
    files = [str(tmp_path / name) for name in ("tshirt.png", "sneaker.jpg", "tshirt.tiff")]

    page.goto(service_url + "/")
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('model ')")
    page.set_input_files("#score-files", files)
    page.wait_for_selector(".result-card >> nth=2")
    verdicts = {
        card.get_attribute("data-name"): card.query_selector(".verdict").inner_text()
        for card in page.query_selector_all(".result-card")
    }
    assert verdicts == {"tshirt.png": "normal", "sneaker.jpg": "anomaly", "tshirt.tiff": "normal"}
    sizes = "images => images.map(i => i.complete && i.naturalWidth)"
    assert page.eval_on_selector_all(".result-card img.heatmap", sizes) == [28, 28, 28]
    # Beside each upload, the 28 x 28 image the model saw; the TIFF gets a note, not a picture.
    assert page.eval_on_selector_all(".result-card img.model-input", sizes) == [28, 28, 28]
    page.wait_for_selector(".result-card .no-preview")
    assert page.eval_on_selector_all(".result-card img.original", sizes) == [28, 112]
    assert "p-value" in page.inner_text(".result-card")
    _screenshot(page, tmp_path, "console-score.png")

    page.click("button[data-view=generate]")
    page.fill("#sample-seed", "7")
    page.click("#sample-draw")
    page.wait_for_selector(".sample-grid[data-seed='7'] img")
    page.click("#sample-more")
    page.wait_for_selector(".sample-grid[data-seed='8'] img")
    widths = page.eval_on_selector_all(
        ".sample-grid img", "images => images.map(i => i.complete && i.naturalWidth)"
    )
    assert widths == [4 * 28 + 6, 4 * 28 + 6], widths  # 16 images: a 4 x 4 grid, 2 px gaps
    page.set_input_files("#interp-a", files[0])
    page.set_input_files("#interp-b", files[1])
    page.click("#interp-go")
    page.wait_for_selector("#interp-result:not([hidden])")
    first = page.get_attribute("#interp-image", "src")
    page.eval_on_selector(
        "#interp-slider",
        "s => { s.value = s.max; s.dispatchEvent(new Event('input')); }",
    )
    assert page.get_attribute("#interp-slider", "max") == "11"
    assert page.get_attribute("#interp-image", "src") != first
    _screenshot(page, tmp_path, "console-generate.png")


def _other_version(trained_bundle: Path, fashion_mnist: Any, folder: Path) -> Path:
    """The same weights with another threshold: a bundle of another version, as a worker's hot
    swap to a recalibrated model makes."""
    test = fashion_mnist.test
    normal = test.images[test.labels == SMALL_BUNDLE_NORMAL_CLASS][:200]
    out = folder / "recalibrated"
    recalibrate_bundle(trained_bundle, normal, out=out, source="test", target_fpr=0.2)
    return out


def test_live_alerts_view_shows_a_card_for_a_produced_anomaly(
    page: Any,
    start_service: Any,
    kafka_broker: Any,
    trained_bundle: Path,
    fashion_mnist: Any,
    tmp_path: Path,
) -> None:
    topics = make_topics(kafka_broker)
    worker = start_worker(
        model=trained_bundle, topics=topics, log_dir=tmp_path / "logs", timeout_s=60
    )
    try:
        server = start_service(trained_bundle, live_alerts=True, stream=topics.config)
        # A second console serving another version than the worker's (as after its hot swap).
        other_bundle = _other_version(trained_bundle, fashion_mnist, tmp_path)
        other_server = start_service(other_bundle, live_alerts=True, stream=topics.config)
        other_page = page.context.new_page()
        for console, url in ((page, server.url), (other_page, other_server.url)):
            console.goto(url + "/#alerts")
            console.wait_for_function(
                "document.querySelector('#alerts-status').textContent.startsWith('following')"
            )
        test = fashion_mnist.test
        _, anomaly = _images_by_score(trained_bundle, test.images[test.labels == 7][:20])
        producer = create_producer(config=topics.config)
        producer.send(topics.config.input_topic, value=anomaly.tobytes(), key=b"sneaker-1")
        producer.flush(timeout=30)
        producer.close()
        card = page.wait_for_selector(".alert-card")
        assert card.get_attribute("data-source") == f"{topics.config.input_topic}/0/0"
        widths = page.eval_on_selector_all(
            ".alert-card img", "images => images.map(i => i.complete && i.naturalWidth)"
        )
        assert widths == [28, 28, 28]  # the image read back, its reconstruction, its heatmap
        text = card.inner_text()
        version = Detector.from_bundle(trained_bundle, CPU).version
        assert version in text and "p-value" in text and "sneaker-1" in text
        assert card.get_attribute("data-map-by") == version
        assert f"{version} (the alert's model)" in text
        assert "other-model" not in card.get_attribute("class")
        _screenshot(page, tmp_path, "console-alerts.png")

        # The other console draws the map with its own model and says it is not the alert's.
        other_card = other_page.wait_for_selector(".alert-card")
        other_version = Detector.from_bundle(other_bundle, CPU).version
        assert other_version != version
        assert other_card.get_attribute("data-map-by") == other_version
        assert "other-model" in other_card.get_attribute("class")
        other_text = other_card.inner_text()
        assert f"{other_version}, not the alert's model {version}" in other_text, other_text
    finally:
        assert worker.stop() == 0
