"""How long held mail is kept: retention counts only time while no outage of the destination is
declared, up to a hard cap counted on the wall clock. Pure functions over outage periods; no I/O.

A recipient past its retention expires with a 4.4.7 DSN (decided by the engine after a failed attempt,
or by the sweep over DOWN destinations once the hard cap is reached). Outage periods that overlap or
reach into the future are handled; an open outage (ended_at None) runs until `now`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from backupmx.spool import OutagePeriod


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    retention: timedelta  # counted only while no outage is declared
    cap: timedelta  # counted on the wall clock, outages included

    def used(self, received_at: float, now: float, outages: Iterable[OutagePeriod]) -> float:
        return retention_used(received_at, now, outages)

    def expired(self, received_at: float, now: float, outages: Iterable[OutagePeriod]) -> bool:
        return is_expired(received_at, now, outages, retention=self.retention, cap=self.cap)

    def expires_at(self, received_at: float, now: float, outages: Iterable[OutagePeriod]) -> float:
        """When the recipient will expire if no further outage is declared (Will-Retry-Until)."""
        periods = list(outages)
        left = self.retention.total_seconds() - retention_used(received_at, now, periods)
        open_outage = any(p.ended_at is None for p in periods)
        by_retention = now + max(left, 0.0) if not open_outage else float("inf")
        return min(by_retention, received_at + self.cap.total_seconds())


def retention_used(received_at: float, now: float, outages: Iterable[OutagePeriod]) -> float:
    """Seconds of [received_at, now] not covered by any declared outage."""
    if now <= received_at:
        return 0.0
    spans = sorted(
        (max(p.started_at, received_at), min(p.ended_at if p.ended_at is not None else now, now)) for p in outages
    )
    paused = 0.0
    cursor = received_at
    for start, end in spans:
        start = max(start, cursor)
        if end > start:
            paused += end - start
            cursor = end
    return (now - received_at) - paused


def is_expired(
    received_at: float, now: float, outages: Iterable[OutagePeriod], *, retention: timedelta, cap: timedelta
) -> bool:
    if now - received_at >= cap.total_seconds():
        return True
    return retention_used(received_at, now, outages) >= retention.total_seconds()
