"""The stop rule every long-running command shares: the first SIGTERM/SIGINT asks for a clean
finish; for the worker, a second one exits at once with 128 + the signal."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from streams.signals import stop_on_signals


def test_a_signal_sets_the_event_and_the_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        assert not stop.is_set()
        signal.raise_signal(signal.SIGTERM)
        assert stop.is_set()
        signal.raise_signal(signal.SIGTERM)  # again, without second_exits: still running
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_signal_exits_at_once_when_asked() -> None:
    script = textwrap.dedent(
        """
        import signal, time
        from streams.signals import stop_on_signals

        with stop_on_signals(second_exits=True) as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.is_set()
            signal.raise_signal(signal.SIGINT)
            time.sleep(10)
        raise SystemExit(0)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 128 + signal.SIGINT, done.stderr
