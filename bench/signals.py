"""SIGTERM (e.g. from `timeout`) becomes SystemExit in the benchmark scripts, so that their `finally`
blocks and context managers still stop every peer they started and remove their temp dirs."""

from __future__ import annotations

import signal
import sys
from types import FrameType


def exit_on_sigterm() -> None:
    def _exit(signum: int, frame: FrameType | None) -> None:
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
