"""The model side of the service: a loaded bundle, one device thread, the micro-batchers for
scoring and explaining, and the generation calls. Knows numpy and the detector, not HTTP."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector import Detector, load_bundle
from detector.bundle import MANIFEST
from detector.config import DetectorSettings
from detector.explain import decode_mean, encode_mean, explain, latent_codes, to_uint8
from detector.preprocess import ImageSettings
from serve.batching import MicroBatcher
from serve.config import ServeConfig
from serve.images import b64_png, grey_image, heatmap_image
from serve.metrics import ServeMetrics


@dataclass(frozen=True)
class ImageScore:
    score: float
    p_value: float
    anomaly: bool


@dataclass(frozen=True)
class ImageExplanation:
    score: ImageScore
    reconstruction: np.ndarray  # uint8 784
    pixel_nll: np.ndarray  # float32 784, sums to reconstruction_nll
    reconstruction_nll: float


class ModelService:
    """Everything that runs on the device goes through `executor`, one call at a time."""

    def __init__(
        self,
        bundle_path: str | Path,
        *,
        config: ServeConfig,
        metrics: ServeMetrics,
        detector: DetectorSettings | None = None,
        images: ImageSettings | None = None,
    ) -> None:
        bundle = load_bundle(bundle_path)
        self.manifest: dict[str, Any] = json.loads((Path(bundle_path) / MANIFEST).read_text())
        self.detector = Detector.from_bundle(bundle, detector)
        # Uploaded image files become the model's input as the bundle's preprocessing says.
        self.decoding = (images or ImageSettings()).decoding(self.detector.preprocessing)
        self.config = config
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        if config.cpu_threads and self.detector.device.type == "cpu":
            # torch's thread count is per thread: set it on the device thread itself.
            self.executor.submit(torch.set_num_threads, config.cpu_threads).result()
        metrics.model.info({"version": self.version, "device": str(self.detector.device)})
        self.score_batcher: MicroBatcher[ImageScore] = self._batcher(self._score_batch)
        self.explain_batcher: MicroBatcher[ImageExplanation] = self._batcher(self._explain_batch)

    def _batcher(self, run_batch: Any) -> MicroBatcher:
        def observe(size: int, seconds: float) -> None:
            self.metrics.batch_size.observe(size)
            self.metrics.batch_seconds.observe(seconds)

        return MicroBatcher(
            run_batch,
            executor=self.executor,
            max_batch_size=self.config.max_batch_size,
            max_batch_delay_s=self.config.max_batch_delay_ms / 1000.0,
            max_queue_images=self.config.max_queue_images,
            on_batch=observe,
        )

    @property
    def version(self) -> str:
        return self.detector.version

    @property
    def threshold(self) -> float:
        return float(self.detector.threshold)

    def queued_images(self) -> int:
        return self.score_batcher.queued_images + self.explain_batcher.queued_images

    def start(self) -> None:
        self.score_batcher.start()
        self.explain_batcher.start()

    async def stop(self) -> None:
        await self.score_batcher.stop()
        await self.explain_batcher.stop()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self.score_batcher.running and self.explain_batcher.running

    def model_card(self) -> dict[str, Any]:
        calibration = self.detector.calibration
        return {
            "model_version": self.version,
            "model_config": self.manifest.get("model_config"),
            "threshold": self.threshold,
            "target_fpr": float(calibration.target_fpr),
            "calibration_method": calibration.method,
            "calibration_size": calibration.n,
            "device": str(self.detector.device),
            "preprocessing": self.detector.preprocessing.model_dump(mode="json"),
            "metadata": self.manifest.get("metadata", {}),
        }

    # -- on the device thread -----------------------------------------------------------------

    def _count(self, anomalous: np.ndarray) -> None:
        flagged = int(anomalous.sum())
        self.metrics.images.labels(outcome="anomaly").inc(flagged)
        self.metrics.images.labels(outcome="normal").inc(len(anomalous) - flagged)

    def _score_batch(self, images: np.ndarray) -> list[ImageScore]:
        result = self.detector.score(images)
        self._count(result.anomalous)
        return [
            ImageScore(float(s), float(p), bool(a))
            for s, p, a in zip(
                result.scores.tolist(),
                result.p_values.tolist(),
                result.anomalous.tolist(),
                strict=True,
            )
        ]

    def _explain_batch(self, images: np.ndarray) -> list[ImageExplanation]:
        scores = self._score_batch(images)
        found = explain(self.detector.model, images)
        reconstructions = to_uint8(found.reconstructions)
        return [
            ImageExplanation(
                scores[i],
                reconstructions[i],
                found.pixel_nll[i],
                float(found.reconstruction_nll[i]),
            )
            for i in range(len(images))
        ]

    def explain_now(self, image: np.ndarray, *, model_version: str | None) -> dict[str, Any]:
        """Card fields for one image of an alert raised by `model_version`, computed on the
        device thread (for the alert follower, which runs in its own thread).

        The service holds one model. When it is the alert's, the map shows what that model
        saw; when it is not (a worker that hot-swapped, or runs another bundle), the map is
        still drawn, by the served model, and the fields say so: `served_model_version` names
        the model that drew it, `explained_by_alert_model` whether that is the alert's."""
        (found,) = self.executor.submit(self._explain_batch, image.reshape(1, -1)).result()
        return {
            "image_png": b64_png(grey_image(image)),
            "reconstruction_png": b64_png(grey_image(found.reconstruction)),
            "heatmap_png": b64_png(heatmap_image(found.pixel_nll)),
            "served_score": found.score.score,
            "served_model_version": self.version,
            "explained_by_alert_model": model_version == self.version,
        }

    def sample(self, n: int, *, seed: int, temperature: float, prior: bool) -> np.ndarray:
        model = self.detector.model
        codes = latent_codes(model, n, seed=seed, temperature=temperature, prior=prior)
        return to_uint8(decode_mean(model, codes))

    def interpolate_codes(self, start: np.ndarray, end: np.ndarray, steps: int) -> np.ndarray:
        weights = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
        return to_uint8(decode_mean(self.detector.model, (1 - weights) * start + weights * end))

    def encode(self, images: np.ndarray) -> np.ndarray:
        return encode_mean(self.detector.model, images)

    def seed_codes(self, seeds: list[int], *, prior: bool) -> np.ndarray:
        model = self.detector.model
        return np.concatenate([latent_codes(model, 1, seed=s, prior=prior) for s in seeds])
