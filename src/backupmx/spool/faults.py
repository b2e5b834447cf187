"""Fault injection for kill tests: `fault_point("spool.before_commit")` kills the process with SIGKILL
when the environment names that point, so tests can stop us at every step of the write path.

    BACKUPMX_FAULT=spool.before_commit   the point (one name; see FAULT_POINTS for the known ones)
    BACKUPMX_FAULT_AFTER=N               trigger on the N-th time the point is reached (default 1)
    BACKUPMX_FAULT_ACTION=raise          raise InjectedFault there instead (each time from the N-th on):
                                         an unexpected error, for the poison-message tests

Without BACKUPMX_FAULT this costs one dict lookup. Any layer may declare its own points
("delivery.after_remote_250"); the environment is read on every call, so tests may set it late.
"""

from __future__ import annotations

import os
import signal
import threading

FAULT_POINTS = (
    "spool.before_commit",  # a group containing a put is written, COMMIT not yet issued
    "spool.after_commit",  # COMMIT returned, the callers' futures not yet resolved
    "delivery.after_remote_250",  # the primary said 250, nothing recorded yet
    "delivery.after_delivered_commit",  # the 250s are committed, the other outcomes and DSNs not yet
    "delivery.before_dsn_commit",  # the DSNs are built, their commit not yet issued
)

_lock = threading.Lock()
_hits: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """The error BACKUPMX_FAULT_ACTION=raise makes a fault point raise."""


def fault_point(name: str) -> None:
    """Kill this process (SIGKILL, no cleanup), or raise InjectedFault, if BACKUPMX_FAULT names `name`
    and its count is reached."""
    if os.environ.get("BACKUPMX_FAULT") != name:
        return
    try:
        after = max(1, int(os.environ.get("BACKUPMX_FAULT_AFTER", "1")))
    except ValueError:
        after = 1
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        hit = _hits[name]
    if hit >= after:
        if os.environ.get("BACKUPMX_FAULT_ACTION") == "raise":
            raise InjectedFault(f"fault injected at {name} (hit {hit})")
        os.kill(os.getpid(), signal.SIGKILL)
