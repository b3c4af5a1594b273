"""Reading images out of a request: multipart image files, one image file as the body (image/*),
or JSON ({"images": [784 ints | base64 of 784 bytes, ...]}); and the body size limit. Files are
decoded off the event loop, in the preprocessing's threads."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile

from detector.preprocess import ImageDecoding
from serve.errors import InputError, error_response
from serve.images import check_count, decode_image_files, decode_json_images


@dataclass(frozen=True)
class RequestImages:
    images: np.ndarray  # uint8 N x 784: what the model sees
    names: list[str] | None  # file names of uploaded image files


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(400, "bad_json", f"the body is not valid JSON ({exc})") from None


async def read_images(request: Request, *, limit: int, decoding: ImageDecoding) -> RequestImages:
    """The request's images as the model sees them; image files through `decoding`, the
    served bundle's preprocessing."""
    media = _media_type(request)
    if media == "application/json":
        return RequestImages(decode_json_images(await read_json(request), limit=limit), None)
    if media == "multipart/form-data":
        form = await request.form(max_files=limit * 2, max_fields=limit * 2)
        uploads = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        check_count(len(uploads), limit)
        names = [f.filename or f"file{i}" for i, f in enumerate(uploads)]
        files = [await f.read() for f in uploads]
        images = await asyncio.to_thread(decode_image_files, files, names=names, decoding=decoding)
        return RequestImages(images, names)
    if media.startswith("image/") or media == "application/octet-stream":
        body = await request.body()
        images = await asyncio.to_thread(
            decode_image_files, [body], names=["body"], decoding=decoding
        )
        return RequestImages(images, None)
    raise InputError(
        415,
        "unsupported_media_type",
        f"Content-Type {media or '(none)'!r} is not accepted: send multipart/form-data image "
        "files, application/json, or one image file as the body (image/png, image/jpeg, ...)",
    )


class BodyTooLargeError(InputError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "body_too_large", f"the request body is over {limit} bytes")


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once from Content-Length, or while it streams in
    (chunked uploads) by counting what the app reads."""

    def __init__(self, app: Any, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    error = BodyTooLargeError(self.max_bytes)
                    response = error_response(error.status, error.code, error.message)
                    await response(scope, receive, send)
                    return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        await self.app(scope, counted, send)
