"""Failed writes of the side logs (the mail log, the continuity audit log, the alert state file): never
fatal to mail. Each failure is counted per log (`/metrics`: backupmx_log_write_errors_total) and reported
on the diagnostic log at most once a minute per log, with how many writes failed since the last report;
the first write that works again says so. Imports nothing of ours; one tally per process (`FAILURES`),
like the logs it counts."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger("backupmx.logs")

REPORT_EVERY = 60.0  # seconds between two reports about the same log


class LogName(StrEnum):
    MAILLOG = "maillog"
    CONTINUITY_AUDIT = "continuity_audit"
    ALERT_STATE = "alert_state"


@dataclass(slots=True)
class _Tally:
    total: int = 0
    unreported: int = 0
    since_ok: int = 0  # failures since the last write that worked
    reported_at: float = float("-inf")


class WriteFailures:
    """Thread-safe: the mail log is written from the event loop and from worker threads."""

    def __init__(self, *, report_every: float = REPORT_EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = report_every
        self._clock = clock
        self._lock = threading.Lock()
        self._tally = {name: _Tally() for name in LogName}

    def failed(self, name: LogName, error: BaseException, where: object = "") -> None:
        with self._lock:
            t = self._tally[name]
            t.total += 1
            t.unreported += 1
            t.since_ok += 1
            now = self._clock()
            if now - t.reported_at < self._every:
                return
            n, t.unreported, t.reported_at = t.unreported, 0, now
        # outside the lock: the diagnostic log may itself be the stream that fails (logging swallows that)
        what = getattr(error, "strerror", None) or repr(error)
        log.error("%s %s: %d write(s) failed (%s); mail goes on, the lines are lost", name.value, where, n, what)

    def succeeded(self, name: LogName, where: object = "") -> None:
        t = self._tally[name]
        if not t.since_ok:  # the common case: no lock taken
            return
        with self._lock:
            lost, t.since_ok, t.unreported = t.since_ok, 0, 0
            t.reported_at = float("-inf")
        if lost:
            log.warning("%s %s: writing again (%d write(s) lost)", name.value, where, lost)

    def counts(self) -> dict[LogName, int]:
        with self._lock:
            return {name: t.total for name, t in self._tally.items()}


FAILURES = WriteFailures()
