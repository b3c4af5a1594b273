"""The FastAPI application: routes, auth, console, health and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from detector.grid import image_grid
from serve.alerts import AlertFollower, AlertHub
from serve.batching import QueueFullError
from serve.config import ServeConfig
from serve.errors import InputError, install_error_handlers
from serve.images import (
    b64_png,
    decode_json_images,
    grey_image,
    heatmap_image,
    png_bytes,
)
from serve.inputs import BodyLimitMiddleware, read_images
from serve.metrics import MetricsMiddleware, ServeMetrics
from serve.service import ImageExplanation, ModelService
from streams.config import StreamConfig

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
_KEEPALIVE_S = 15.0

IMAGES_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "images": {"type": "array", "items": {"type": "string", "format": "binary"}}
                },
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["images"],
                "properties": {
                    "images": {
                        "type": "array",
                        "description": "784 ints 0..255 (row-major 28x28), or base64 of the "
                        "784 bytes, per image",
                        "items": {
                            "oneOf": [
                                {"type": "array", "items": {"type": "integer"}},
                                {"type": "string", "format": "byte"},
                            ]
                        },
                    }
                },
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}


class SampleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(16, ge=1, description="Number of images to draw.")
    seed: int = Field(0, ge=0, description="Seed of the latent codes (same seed, same images).")
    temperature: float = Field(
        1.0, gt=0, le=10, description="Scales the spread of the latent codes (1: as fitted)."
    )
    prior: bool = Field(
        False,
        description="Draw z from the N(0, I) prior instead of the density fitted to the "
        "training latents (bundles without one always use the prior).",
    )
    format: Literal["png", "json"] = Field("json", description="png: one image/png grid.")


class InterpolateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: list[list[int] | str] | None = Field(
        None, description="Two images (784 ints or base64 of 784 bytes): the path's ends."
    )
    seeds: list[int] | None = Field(
        None, description="Or two seeds: the code /v1/sample draws with each seed and n=1."
    )
    prior: bool = Field(False, description="With seeds: codes from the N(0, I) prior.")
    steps: int = Field(8, ge=2, description="Images on the path, both ends included.")
    format: Literal["png", "json"] = "json"


def _score_json(result: Any, index: int, name: str | None) -> dict[str, Any]:
    row = {"index": index, "score": result.score, "p_value": result.p_value}
    row["anomaly"] = result.anomaly
    if name is not None:
        row["name"] = name
    return row


def _explain_json(
    found: ImageExplanation, image: np.ndarray, index: int, name: str | None
) -> dict[str, Any]:
    """An explanation, with the 28 x 28 image the model saw (an upload after preprocessing)."""
    return {
        **_score_json(found.score, index, name),
        "input_png": b64_png(grey_image(image)),
        "input": image.tolist(),
        "reconstruction_nll": found.reconstruction_nll,
        "reconstruction_png": b64_png(grey_image(found.reconstruction)),
        "heatmap_png": b64_png(heatmap_image(found.pixel_nll)),
        "reconstruction": found.reconstruction.tolist(),
        "pixel_nll": np.asarray(found.pixel_nll, dtype=np.float64).reshape(28, 28).tolist(),
    }


def create_app(
    service: ModelService,
    *,
    config: ServeConfig,
    registry: CollectorRegistry,
    metrics: ServeMetrics,
    stream: StreamConfig | None = None,
) -> FastAPI:
    """The app; `stream` turns on the live alert view (follows stream.alert_topic)."""
    hub = AlertHub(recent=config.recent_alerts)
    follower = (
        AlertFollower(
            stream=stream,
            hub=hub,
            explain=service.explain_now,
            replay_recent=config.recent_alerts,
            images=service.decoding,
        )
        if stream is not None
        else None
    )
    stopping = asyncio.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.bind(asyncio.get_running_loop())
        service.start()
        if follower is not None:
            follower.start()
        try:
            yield
        finally:
            stopping.set()
            if follower is not None:
                await asyncio.to_thread(follower.stop)
            await service.stop()

    app = FastAPI(
        title="vaewatch",
        version="1",
        summary="Score and explain images (any size, made the model's 28x28 input by the "
        "bundle's preprocessing), and generate 28x28 images, with a VAE model bundle.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    metrics.queued_images.set_function(service.queued_images)
    # An empty token (an unset environment variable in a manifest) means no token, not "".
    token = (config.bearer_token.get_secret_value() if config.bearer_token else "") or None

    def authorised(request: Request, access_token: str | None = Query(None)) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else (access_token or "")
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise InputError(
                401,
                "unauthorized",
                "this service needs `Authorization: Bearer <token>` (serve.bearer_token)",
                {"WWW-Authenticate": "Bearer"},
            )

    auth = [Depends(authorised)]

    def _busy(exc: QueueFullError) -> InputError:
        metrics.rejected.inc()
        return InputError(503, "overloaded", str(exc), {"Retry-After": str(config.retry_after_s)})

    @app.post("/v1/score", dependencies=auth, openapi_extra={"requestBody": IMAGES_BODY})
    async def score(request: Request) -> dict[str, Any]:
        """Score, p-value and verdict of each image, as `vaewatch score` gives them."""
        got = await read_images(
            request, limit=config.max_images_per_request, decoding=service.decoding
        )
        try:
            results = await service.score_batcher.submit(got.images)
        except QueueFullError as exc:
            raise _busy(exc) from None
        names = got.names or [None] * len(results)
        return {
            "model_version": service.version,
            "threshold": service.threshold,
            "results": [_score_json(r, i, names[i]) for i, r in enumerate(results)],
        }

    @app.post(
        "/v1/explain",
        dependencies=auth,
        openapi_extra={"requestBody": IMAGES_BODY},
        responses={200: {"content": {"image/png": {}}}},
    )
    async def explain(
        request: Request,
        image: Annotated[
            Literal["strip", "heatmap", "reconstruction"] | None,
            Query(
                description="Answer one image as image/png: input|reconstruction|heatmap "
                "side by side (strip), or one of them. Also picked by Accept: image/png."
            ),
        ] = None,
    ) -> Any:
        """Reconstruction and per-pixel anomaly map (each pixel's share of the reconstruction
        term, in nats: the map sums to `reconstruction_nll`) of each image."""
        got = await read_images(
            request, limit=config.max_images_per_request, decoding=service.decoding
        )
        wants_png = image is not None or "image/png" in request.headers.get("accept", "")
        if wants_png and len(got.images) != 1:
            raise InputError(
                400, "one_image_for_png", "image/png answers need exactly one image in the request"
            )
        try:
            found = await service.explain_batcher.submit(got.images)
        except QueueFullError as exc:
            raise _busy(exc) from None
        if wants_png:
            one = found[0]
            parts = {
                "reconstruction": np.repeat(grey_image(one.reconstruction)[..., None], 3, axis=2),
                "heatmap": heatmap_image(one.pixel_nll),
            }
            if (image or "strip") == "strip":
                source = np.repeat(grey_image(got.images[0])[..., None], 3, axis=2)
                picture = np.concatenate([source, parts["reconstruction"], parts["heatmap"]], 1)
            else:
                picture = parts[image]
            return Response(png_bytes(picture), media_type="image/png")
        names = got.names or [None] * len(found)
        return {
            "model_version": service.version,
            "threshold": service.threshold,
            "results": [_explain_json(f, got.images[i], i, names[i]) for i, f in enumerate(found)],
        }

    async def _on_device(function: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(service.executor, lambda: function(*args, **kwargs))

    def _images_answer(images: np.ndarray, fmt: str, **extra: Any) -> Any:
        grid = image_grid(images, columns=extra.pop("columns", None))
        if fmt == "png":
            return Response(png_bytes(grid), media_type="image/png")
        return {
            **extra,
            "model_version": service.version,
            "grid_png": b64_png(grid),
            "images_png": [b64_png(grey_image(i)) for i in images],
            "images": images.tolist(),
        }

    @app.post("/v1/sample", dependencies=auth, responses={200: {"content": {"image/png": {}}}})
    async def sample(body: SampleRequest) -> Any:
        """Images decoded (the decoder's mean) from latent codes drawn from the density fitted
        to the training latents, as `vaewatch sample` draws them, or from the prior."""
        if body.n > config.max_samples:
            raise InputError(
                413, "too_many_images", f"n={body.n}; at most {config.max_samples} per request"
            )
        images = await _on_device(
            service.sample, body.n, seed=body.seed, temperature=body.temperature, prior=body.prior
        )
        return _images_answer(
            images, body.format, n=body.n, seed=body.seed, temperature=body.temperature
        )

    @app.post("/v1/interpolate", dependencies=auth, responses={200: {"content": {"image/png": {}}}})
    async def interpolate(body: InterpolateRequest) -> Any:
        """The decoded straight path between two latent codes: the encoder means of two
        images, or the codes /v1/sample draws with two seeds (n=1)."""
        if (body.images is None) == (body.seeds is None):
            raise InputError(400, "bad_request", 'give either "images" or "seeds", two of them')
        ends = body.images if body.images is not None else body.seeds
        if len(ends) != 2:
            raise InputError(400, "bad_request", f"two path ends needed, got {len(ends)}")
        if body.steps > config.max_interpolation_steps:
            raise InputError(
                413,
                "too_many_images",
                f"steps={body.steps}; at most {config.max_interpolation_steps}",
            )
        if body.images is not None:
            images = decode_json_images({"images": body.images}, limit=2)
            codes = await _on_device(service.encode, images)
        else:
            codes = await _on_device(service.seed_codes, body.seeds, prior=body.prior)
        path = await _on_device(service.interpolate_codes, codes[0], codes[1], body.steps)
        return _images_answer(path, body.format, steps=body.steps, columns=body.steps)

    @app.get("/v1/model", dependencies=auth)
    async def model() -> dict[str, Any]:
        """The served bundle: version, config, threshold, target FPR, calibration size."""
        return service.model_card()

    @app.get("/v1/alerts", dependencies=auth)
    async def alerts() -> dict[str, Any]:
        """Whether the live view is on, and the most recent alert cards."""
        return {
            "enabled": follower is not None,
            "connected": bool(follower and follower.connected),
            "alert_topic": stream.alert_topic if stream else None,
            "recent": list(hub.recent),
        }

    @app.get("/v1/alerts/stream", dependencies=auth, response_class=StreamingResponse)
    async def alert_stream(request: Request) -> StreamingResponse:
        """Server-sent events: one `alert` event per new alert card (JSON)."""
        if follower is None:
            raise InputError(
                404, "live_alerts_off", "live alerts are off (serve.live_alerts and stream.*)"
            )
        queue = hub.subscribe()

        async def events() -> AsyncIterator[str]:
            try:
                yield ": connected\n\n"
                while not stopping.is_set() and not await request.is_disconnected():
                    try:
                        card = await asyncio.wait_for(queue.get(), 1.0)
                    except asyncio.TimeoutError:
                        continue
                    yield f"event: alert\ndata: {json.dumps(card)}\n\n"
            finally:
                hub.unsubscribe(queue)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return Response("ok\n", media_type="text/plain")

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        checks = {"model_loaded": True, "batching": service.ready}
        if follower is not None:
            checks["alert_topic"] = follower.connected
        ready = checks["batching"]  # the live view is optional: scoring works without it
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def console() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
