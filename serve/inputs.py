"""Reading images out of a request: multipart PNG files, a raw image/png body, or JSON
({"images": [784 ints | base64 of 784 bytes, ...]}); and the body size limit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile

from serve.errors import InputError, error_response
from serve.images import check_count, decode_json_images, decode_png


@dataclass(frozen=True)
class RequestImages:
    images: np.ndarray  # uint8 N x 784
    names: list[str] | None  # file names of uploaded PNGs


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(400, "bad_json", f"the body is not valid JSON ({exc})") from None


async def read_images(request: Request, *, limit: int) -> RequestImages:
    media = _media_type(request)
    if media == "application/json":
        return RequestImages(decode_json_images(await read_json(request), limit=limit), None)
    if media == "multipart/form-data":
        form = await request.form(max_files=limit * 2, max_fields=limit * 2)
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        check_count(len(files), limit)
        names = [f.filename or f"file{i}" for i, f in enumerate(files)]
        rows = [decode_png(await f.read(), name=name) for f, name in zip(files, names, strict=True)]
        return RequestImages(np.stack(rows), names)
    if media == "image/png":
        return RequestImages(decode_png(await request.body(), name="body")[None, :], None)
    raise InputError(
        415,
        "unsupported_media_type",
        f"Content-Type {media or '(none)'!r} is not accepted: send multipart/form-data PNG "
        "files, application/json or one image/png",
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
