"""A watchdog for test peers: a tiny `sh` that waits for EOF on its stdin, then runs a cleanup command.
We hold the pipe's write end, so if this Python process dies without cleaning up (SIGKILL, a killed
pytest), the peer is still stopped and its temp dir removed. After a normal stop, `disarm()` ends the
watchdog without running the cleanup."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


class Watchdog:
    def __init__(self, script: str, *args: str) -> None:
        """`script` is sh code run after our death; "$1", "$2"... are `args`."""
        self._proc = subprocess.Popen(
            ["/bin/sh", "-c", f"cat >/dev/null; {script}", "watchdog", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a ^C to our process group must not trigger it early
        )

    def disarm(self) -> None:
        """The peer was stopped normally: end the watchdog without running its cleanup."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)  # sh and its cat
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        self._proc.wait(timeout=5)
