"""A daemon a test starts in the foreground and owns (rspamd, slapd): how it is stopped (SIGTERM, then
SIGKILL after 10 s) and its use as a context manager. The subclass writes its config, starts `proc` and
waits for its own readiness probe in `start()`."""

from __future__ import annotations

import signal
import subprocess
from typing import Self


class PeerProcess:
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
