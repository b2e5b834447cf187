"""systemd's service notifications (sd_notify(3)) for `Type=notify` units: READY=1 once every listener is
bound, WATCHDOG=1 every WATCHDOG_USEC/2 while running, STOPPING=1 when a graceful stop begins.

Hand-written, not a library: the protocol is one datagram to the AF_UNIX socket named in $NOTIFY_SOCKET
(a leading "@" names the abstract namespace); python-systemd needs libsystemd's headers to build and the
small `sdnotify` package has been unmaintained for years. Without $NOTIFY_SOCKET every call does nothing.
A send that fails is logged and dropped: a notification never stops mail (systemd then reports the unit
as failed to start or restarts it, which an operator sees).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping

log = logging.getLogger("backupmx.sdnotify")

SEND_TIMEOUT = 2.0  # seconds; systemd reads at once, a stuck reader must not hang the event loop for long


class Notifier:
    """Sends states to the service manager named by the environment, if any."""

    def __init__(self, address: str | None, watchdog_interval: float | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog_interval  # seconds between WATCHDOG=1, or None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        raw = environ.get("NOTIFY_SOCKET", "")
        address = None
        if raw.startswith("@"):
            address = "\0" + raw[1:]  # the abstract namespace: no file, a leading NUL byte
        elif raw.startswith("/"):
            address = raw
        elif raw:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract: no notifications sent", raw)
        interval = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if address and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            interval = int(usec) / 2_000_000  # half the deadline, as sd_watchdog_enabled(3) advises
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *states: str) -> bool:
        """One datagram with the states, newline-separated; True when it was sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto("\n".join(states).encode(), self.address)
        except OSError as e:
            log.warning("sd_notify %s: %s", ",".join(s.partition("=")[0] for s in states), e)
            return False
        return True

    async def keep_alive(self) -> None:
        """WATCHDOG=1 every interval while the event loop runs (a stuck loop stops them: systemd restarts)."""
        if self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)


@contextlib.asynccontextmanager
async def running(status: str, environ: Mapping[str, str] = os.environ) -> AsyncIterator[Notifier]:
    """READY=1 on entry (call it once every listener is bound), the watchdog inside, STOPPING=1 on exit."""
    notifier = Notifier.from_environment(environ)
    notifier.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
    watchdog = asyncio.create_task(notifier.keep_alive(), name="systemd watchdog")
    try:
        yield notifier
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        notifier.send("STOPPING=1", "STATUS=stopping: finishing sessions and deliveries in flight")
