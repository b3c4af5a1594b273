"""Every route of `vaewatch serve` through a real uvicorn server, on real Fashion-MNIST."""

from __future__ import annotations

import base64
import csv
import http.client
import io
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry

from detector import Detector, load_bundle, save_bundle
from detector.loss import reconstruction_nll
from detector.model import to_model_input
from detector.preprocess import ImageDecoding, preprocess_image
from serve.config import ServeConfig
from serve.metrics import ServeMetrics
from serve.service import ModelService
from tests.fixtures_model import CPU
from tests.serve.http_helpers import get, png, post_files, post_json, request

N_IMAGES = 40


@pytest.fixture(scope="module")
def test_images(fashion_mnist) -> np.ndarray:
    """Real test images of every class (the bundle's normal class 0 and nine others)."""
    test = fashion_mnist.test
    picks = np.concatenate([np.flatnonzero(test.labels == c)[:4] for c in range(10)])
    return test.images[picks].reshape(-1, 784)


def _cli_scores(bundle: Path, images: np.ndarray, tmp_path: Path) -> list[dict[str, str]]:
    from vaewatch.cli import main as vaewatch

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        (folder / f"img{i:03d}.png").write_bytes(png(image))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    out = tmp_path / "scores.csv"
    argv = ["--config", str(empty), "--set", "detector.device=cpu"]
    assert vaewatch([*argv, "score", "--model", str(bundle), str(folder), "--out", str(out)]) == 0
    return list(csv.DictReader(out.open()))


def test_scores_equal_vaewatch_score_for_png_json_and_base64(
    service_url: str, trained_bundle: Path, test_images: np.ndarray, tmp_path: Path
) -> None:
    expected = _cli_scores(trained_bundle, test_images, tmp_path)
    files = [(f"img{i:03d}.png", png(image)) for i, image in enumerate(test_images)]
    uploaded = post_files(service_url, "/v1/score", files)
    as_lists = post_json(service_url, "/v1/score", {"images": test_images.tolist()})
    as_base64 = post_json(
        service_url,
        "/v1/score",
        {"images": [base64.b64encode(image.tobytes()).decode() for image in test_images]},
    )
    model = load_bundle(trained_bundle)
    for answer in (uploaded, as_lists, as_base64):
        assert answer.status == 200, answer.body
        body = answer.json()
        assert body["model_version"] == model.version
        assert body["threshold"] == model.calibration.threshold
        results = body["results"]
        assert len(results) == N_IMAGES
        for row, want in zip(results, expected, strict=True):
            assert row["score"] == float(want["score"])
            assert row["p_value"] == float(want["p_value"])
            assert row["anomaly"] == bool(int(want["anomaly"]))
    assert [r["name"] for r in uploaded.json()["results"]] == [f for f, _ in files]
    flagged = [r["anomaly"] for r in as_lists.json()["results"]]
    assert any(flagged) and not all(flagged), "real data should give both verdicts"


def _png16(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.reshape(28, 28).astype(np.uint16) * 257).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_png_scores_the_same_over_http_as_with_vaewatch_score(
    service_url: str, trained_bundle: Path, test_images: np.ndarray, tmp_path: Path
) -> None:
    """One decoder (detector/preprocess.py): HTTP once clipped 16-bit samples at 255 (nearly
    white) while `vaewatch score` scaled them, so the same file got two scores."""
    images = test_images[:6]
    files = [(f"img{i:03d}.png", _png16(image)) for i, image in enumerate(images)]
    folder = tmp_path / "pngs16"
    folder.mkdir()
    for name, data in files:
        (folder / name).write_bytes(data)
    from vaewatch.cli import main as vaewatch

    out = tmp_path / "scores16.csv"
    argv = ["--set", "detector.device=cpu", "score", "--model", str(trained_bundle)]
    assert vaewatch([*argv, str(folder), "--out", str(out)]) == 0
    from_cli = [float(row["score"]) for row in csv.DictReader(out.open())]
    answer = post_files(service_url, "/v1/score", files)
    assert answer.status == 200, answer.body
    over_http = [row["score"] for row in answer.json()["results"]]
    as_8_bit = post_json(service_url, "/v1/score", {"images": images.tolist()}).json()
    assert over_http == from_cli == [row["score"] for row in as_8_bit["results"]]


def test_an_image_file_of_any_size_is_explained_with_the_28x28_input_the_model_saw(
    service_url: str, trained_bundle: Path, test_images: np.ndarray
) -> None:
    photo = Image.fromarray(test_images[7].reshape(28, 28)).resize((320, 240)).convert("RGB")
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    answer = post_files(service_url, "/v1/explain", [("photo.jpg", data)])
    assert answer.status == 200, answer.body
    (row,) = answer.json()["results"]
    seen = np.asarray(row["input"], dtype=np.uint8)
    detector = Detector.from_bundle(trained_bundle, CPU)
    np.testing.assert_array_equal(
        seen, preprocess_image(data, ImageDecoding(detector.preprocessing))
    )
    assert seen.reshape(28, 28)[:3].max() == 0  # 4:3, padded with background
    picture = Image.open(io.BytesIO(base64.b64decode(row["input_png"])))
    assert picture.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(picture).ravel(), seen)
    assert row["score"] == pytest.approx(float(detector.score(seen[None]).scores[0]), rel=1e-6)
    as_body = request(
        service_url, "POST", "/v1/score", body=data, content_type="image/jpeg"
    ).json()["results"][0]
    assert as_body["score"] == row["score"]


def test_a_bundle_without_recorded_preprocessing_takes_28x28_files_only(
    start_service, trained_bundle: Path, test_images: np.ndarray, tmp_path: Path
) -> None:
    """Bundles written before the preprocessing was recorded keep their behaviour."""
    bundle = load_bundle(trained_bundle)
    old = tmp_path / "old-bundle"
    save_bundle(old, model=bundle.model, calibration=bundle.calibration, metadata=bundle.metadata)
    assert "preprocessing" not in (old / "bundle.json").read_text()
    server = start_service(old)
    ok = post_files(server.url, "/v1/score", [("a.png", png(test_images[0]))])
    assert ok.status == 200, ok.body
    big = post_files(server.url, "/v1/score", [("big.png", png(np.zeros(32 * 32), size=32))])
    assert big.status == 400 and big.error_code() == "wrong_size"
    assert "32x32, not 28x28" in big.json()["error"]["message"]
    card = get(server.url, "/v1/model").json()
    assert card["preprocessing"]["aspect"] == "exact"


def test_explain_maps_have_the_image_shape_and_sum_to_the_reconstruction_term(
    service_url: str, trained_bundle: Path, test_images: np.ndarray
) -> None:
    images = test_images[::4]
    answer = post_json(service_url, "/v1/explain", {"images": images.tolist()})
    assert answer.status == 200, answer.body
    results = answer.json()["results"]
    scores = post_json(service_url, "/v1/score", {"images": images.tolist()}).json()["results"]
    # The reconstruction term computed here, independently, with the detector's own loss.
    model = load_bundle(trained_bundle).model
    with torch.inference_mode():
        x = to_model_input(torch.from_numpy(images.copy()))
        mu, _ = model.encode(x)
        term = reconstruction_nll(
            x, model.decode(mu), likelihood=model.config.likelihood, log_sigma=model.log_sigma
        ).numpy()
    for i, row in enumerate(results):
        heatmap = np.asarray(row["pixel_nll"])
        assert heatmap.shape == (28, 28)
        assert heatmap.sum() == pytest.approx(row["reconstruction_nll"], rel=1e-6)
        assert row["reconstruction_nll"] == pytest.approx(float(term[i]), rel=1e-5)
        assert row["score"] == scores[i]["score"] and row["anomaly"] == scores[i]["anomaly"]
        assert len(row["reconstruction"]) == 784
        for key in ("reconstruction_png", "heatmap_png"):
            picture = Image.open(io.BytesIO(base64.b64decode(row[key])))
            assert picture.size == (28, 28)
    # The map points at where the image is badly reconstructed: pixels with the largest share
    # have a larger reconstruction error than the rest.
    row = results[-1]
    error = np.abs(np.asarray(row["reconstruction"], float) - images[-1].astype(float))
    share = np.asarray(row["pixel_nll"]).ravel()
    top = share >= np.quantile(share, 0.9)
    assert error[top].mean() > error[~top].mean()

    one = request(
        service_url, "POST", "/v1/explain?image=strip", body=png(images[0]),
        content_type="image/png",
    )  # fmt: skip
    assert one.status == 200 and one.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(one.body)).size == (84, 28)
    heatmap_only = request(
        service_url, "POST", "/v1/explain", body=png(images[0]), content_type="image/png",
        headers={"Accept": "image/png"},
    )  # fmt: skip
    assert heatmap_only.headers["content-type"] == "image/png"


def test_sample_draws_what_vaewatch_sample_draws(service_url: str, trained_bundle: Path) -> None:
    """Same seed, same images as `vaewatch sample` (VAE.sample with a seeded CPU generator):
    from the fitted latent density by default, from the N(0, I) prior with "prior": true."""
    model = load_bundle(trained_bundle).model
    assert model.latent is not None  # the default config fits a latent density

    def cli_images(prior: bool) -> list[list[int]]:
        generator = torch.Generator(device="cpu").manual_seed(5)
        with torch.inference_mode():
            pixels = model.sample(4, generator=generator, prior=prior).float().numpy()
        return (pixels * 255.0).round().astype(np.uint8).tolist()

    fitted = post_json(service_url, "/v1/sample", {"n": 4, "seed": 5}).json()["images"]
    prior = post_json(service_url, "/v1/sample", {"n": 4, "seed": 5, "prior": True})
    fitted_cli, prior_cli = cli_images(False), cli_images(True)
    diff = np.abs(np.asarray(fitted, dtype=int) - np.asarray(fitted_cli, dtype=int)).max()
    assert diff <= 1  # rounding of the same floats; the codes are identical
    assert np.abs(np.asarray(prior.json()["images"]) - np.asarray(prior_cli)).max() <= 1
    assert fitted != prior.json()["images"]


def test_sample_and_interpolate(service_url: str, test_images: np.ndarray) -> None:
    first = post_json(service_url, "/v1/sample", {"n": 6, "seed": 3})
    again = post_json(service_url, "/v1/sample", {"n": 6, "seed": 3})
    other = post_json(service_url, "/v1/sample", {"n": 6, "seed": 4})
    assert first.status == 200, first.body
    images = np.asarray(first.json()["images"])
    assert images.shape == (6, 784) and images.max() > 0
    assert first.json()["images"] == again.json()["images"]
    assert first.json()["images"] != other.json()["images"]
    hot = post_json(service_url, "/v1/sample", {"n": 6, "seed": 3, "temperature": 2.0})
    assert hot.json()["images"] != first.json()["images"]
    grid = post_json(service_url, "/v1/sample", {"n": 6, "seed": 3, "format": "png"})
    assert grid.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(grid.body)).size == (3 * 28 + 4, 2 * 28 + 2)

    path = post_json(service_url, "/v1/interpolate", {"seeds": [3, 9], "steps": 5})
    assert path.status == 200, path.body
    steps = path.json()["images"]
    assert len(steps) == 5
    # The ends are the codes of the two seeds: /v1/sample's image for each seed with n=1 (up to
    # one grey level: a decoder batch of another size may round a pixel the other way).
    for end, seed in ((steps[0], 3), (steps[-1], 9)):
        alone = post_json(service_url, "/v1/sample", {"n": 1, "seed": seed}).json()["images"][0]
        assert np.abs(np.asarray(end) - np.asarray(alone)).max() <= 1
    pair = test_images[[0, 39]]
    between = post_json(service_url, "/v1/interpolate", {"images": pair.tolist(), "steps": 4})
    assert between.status == 200, between.body
    ends = post_json(service_url, "/v1/explain", {"images": pair.tolist()}).json()["results"]
    walked = np.asarray(between.json()["images"], dtype=int)
    for end, index in ((ends[0], 0), (ends[1], -1)):
        assert np.abs(walked[index] - np.asarray(end["reconstruction"])).max() <= 1


def test_model_docs_health_and_metrics(service_url: str, trained_bundle: Path) -> None:
    bundle = load_bundle(trained_bundle)
    card = get(service_url, "/v1/model").json()
    assert card["model_version"] == bundle.version
    assert card["threshold"] == bundle.calibration.threshold
    assert card["target_fpr"] == bundle.calibration.target_fpr
    assert card["calibration_size"] == bundle.calibration.n
    assert card["model_config"]["kind"] == bundle.model.config.kind
    schema = get(service_url, "/openapi.json").json()
    for path in ("/v1/score", "/v1/explain", "/v1/sample", "/v1/interpolate", "/v1/model"):
        assert path in schema["paths"], path
    assert "multipart/form-data" in schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    assert get(service_url, "/docs").status == 200
    assert get(service_url, "/healthz").status == 200
    ready = get(service_url, "/readyz")
    assert ready.status == 200 and ready.json()["ready"] is True
    assert get(service_url, "/").headers["content-type"].startswith("text/html")
    assert get(service_url, "/static/app.js").status == 200

    post_json(service_url, "/v1/score", {"images": [[0] * 784]})
    post_json(service_url, "/v1/score", {"images": "nope"})
    text = get(service_url, "/metrics").body.decode()
    assert 'vaewatch_serve_requests_total{method="POST",route="/v1/score",status="200"}' in text
    assert 'vaewatch_serve_requests_total{method="POST",route="/v1/score",status="400"}' in text
    assert 'vaewatch_serve_request_duration_seconds_bucket{le="0.005",route="/v1/score"' in text
    assert "vaewatch_serve_batch_size_images_bucket" in text
    assert f'vaewatch_serve_model_info{{device="cpu",version="{bundle.version}"}} 1.0' in text


def test_bearer_token(start_service, trained_bundle: Path) -> None:
    server = start_service(trained_bundle, bearer_token="s3cret")
    payload = {"images": [[0] * 784]}
    missing = post_json(server.url, "/v1/score", payload)
    assert missing.status == 401 and missing.error_code() == "unauthorized"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = post_json(server.url, "/v1/score", payload, headers={"Authorization": "Bearer x"})
    assert wrong.status == 401
    right = post_json(server.url, "/v1/score", payload, headers={"Authorization": "Bearer s3cret"})
    assert right.status == 200
    assert get(server.url, "/healthz").status == 200  # probes need no token


def test_connections_have_nagle_off(start_service, trained_bundle: Path) -> None:
    """A response goes out in two writes (head, body); with Nagle's algorithm on, the body
    waited for the client's delayed ACK (40 ms a request, found by bench/serve_load.py)."""
    server = start_service(trained_bundle)
    host, port = server.url.removeprefix("http://").split(":")
    client = http.client.HTTPConnection(host, int(port), timeout=10)
    client.request("GET", "/healthz")
    assert client.getresponse().read() == b"ok\n"
    connections = server.service.server.server_state.connections
    sockets = [c.transport.get_extra_info("socket") for c in connections]
    assert sockets, "the keep-alive connection should be open"
    for sock in sockets:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    client.close()


def test_an_alert_card_says_which_model_drew_its_map(trained_bundle: Path) -> None:
    """The map is the served model's: the card names it, and says whether it raised the alert
    (a worker that hot-swapped to another bundle raises alerts this service cannot explain)."""
    service = ModelService(
        trained_bundle,
        config=ServeConfig(),
        metrics=ServeMetrics(registry=CollectorRegistry()),
        detector=CPU,
    )
    try:
        image = np.zeros(784, dtype=np.uint8)
        own = service.explain_now(image, model_version=service.version)
        other = service.explain_now(image, model_version="0123456789ab")
        unknown = service.explain_now(image, model_version=None)
    finally:
        service.close()
    for card in (own, other, unknown):
        assert card["served_model_version"] == service.version
        assert card["heatmap_png"] == own["heatmap_png"]
    assert own["explained_by_alert_model"] is True
    assert other["explained_by_alert_model"] is False
    assert unknown["explained_by_alert_model"] is False
