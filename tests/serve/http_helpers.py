"""A small HTTP client for the serve tests (stdlib only): JSON, multipart PNG uploads, raw
bodies; every answer comes back, 4xx and 5xx included. And `vaewatch serve` as a subprocess."""

from __future__ import annotations

import http.client
import io
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from streams.brokers.local import free_port


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error_code(self) -> str:
        return self.json()["error"]["code"]


def request(
    url: str,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    content_type: str | None = None,
    headers: dict[str, str] | None = None,
    chunked: bool = False,
    timeout_s: float = 60.0,
) -> Answer:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    all_headers = dict(headers or {})
    if content_type:
        all_headers["Content-Type"] = content_type
    try:
        if chunked:
            connection.putrequest(method, path)
            for name, value in {**all_headers, "Transfer-Encoding": "chunked"}.items():
                connection.putheader(name, value)
            connection.endheaders()
            step = 64 * 1024
            for start in range(0, len(body or b""), step):
                chunk = body[start : start + step]
                try:
                    connection.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break  # the server answered early and closed
            else:
                connection.send(b"0\r\n\r\n")
        else:
            connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        return Answer(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        connection.close()


def get(url: str, path: str, **kwargs: Any) -> Answer:
    return request(url, "GET", path, **kwargs)


def post_json(url: str, path: str, payload: Any, **kwargs: Any) -> Answer:
    return request(
        url, "POST", path, body=json.dumps(payload).encode(), content_type="application/json",
        **kwargs,
    )  # fmt: skip


def png(image: np.ndarray, *, size: int = 28, mode: str = "L") -> bytes:
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8).reshape(size, size))
    buffer = io.BytesIO()
    picture.convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def multipart(files: list[tuple[str, bytes]], *, field: str = "images") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, data in files:
        out.write(f"--{boundary}\r\n".encode())
        out.write(
            f'Content-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def post_files(url: str, path: str, files: list[tuple[str, bytes]], **kwargs: Any) -> Answer:
    body, content_type = multipart(files)
    return request(url, "POST", path, body=body, content_type=content_type, **kwargs)


@dataclass
class ServeProcess:
    """`vaewatch serve` as a subprocess (its own interpreter, so a busy test process does not
    slow its answers)."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vaewatch serve exited: {self.log_path.read_text()[-2000:]}")
            try:
                if get(self.url, "/readyz", timeout_s=1).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"vaewatch serve not ready: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_serve_process(model: Path, *, log_dir: Path, args: Sequence[str] = ()) -> ServeProcess:
    """Start `vaewatch serve --model MODEL` on a free port (not waiting for it)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"serve-{port}.log"
    command = [
        sys.executable, "-m", "vaewatch.cli", "--set", "detector.device=cpu", *args,
        "serve", "--model", str(model), "--port", str(port),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return ServeProcess(process, f"http://127.0.0.1:{port}", log_path)
