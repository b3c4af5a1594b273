"""`vaewatch serve` on the command line: a port in use is a one-line error, exit 2."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vaewatch.cli import main as vaewatch


def test_a_taken_port_is_a_one_line_error(
    trained_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = vaewatch(
            ["--config", str(empty), "serve", "--model", str(trained_bundle), "--port", str(port)]
        )
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"vaewatch: error: cannot listen on 127.0.0.1:{port}")
    assert "\n" not in error


def test_a_missing_bundle_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    code = vaewatch(
        ["--config", str(empty), "serve", "--model", str(tmp_path / "none"), "--port", "0"]
    )
    assert code == 2
    assert "no model bundle here" in capsys.readouterr().err
