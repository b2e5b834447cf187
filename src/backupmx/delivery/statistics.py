"""The engine's statistics: immutable snapshots (EngineStatistics, DestinationStatistics) that the
admin API, /metrics and tests read, and the running totals they are made from. No I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from backupmx.delivery.route import Target
from backupmx.delivery.work import Destination, Window

EVENTS = ("delivered", "deferred", "bounced", "expired", "held")  # one outcome each, per recipient


@dataclass(frozen=True, slots=True)
class DestinationStatistics:
    domain: str
    concurrency: int  # current connection limit (slow start)
    connections: int  # sessions working now
    cached: int  # idle sessions kept open
    in_flight: int  # transactions under way
    queued: int  # recipients claimed into memory, waiting for a connection
    delivered: int
    deferred: int
    bounced: int
    expired: int
    held: int
    reroute: str | None  # "host:port, ..." while the operator reroutes this destination


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    window: int  # recipients that may be claimed into memory at most
    claimed: int  # recipients in memory now
    delivered: int
    deferred: int
    bounced: int
    expired: int
    held: int
    dsns_queued: int
    destinations: Mapping[str, DestinationStatistics]


class Totals:
    """Outcomes recorded by this engine, per event, and DSNs queued."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys((*EVENTS, "dsns"), 0)

    def count(self, dest: Destination, event: str) -> None:
        if event not in EVENTS:
            raise ValueError(event)
        setattr(dest, event, getattr(dest, event) + 1)
        self.counts[event] += 1

    @property
    def outcomes(self) -> int:
        return sum(self.counts[k] for k in EVENTS)

    def snapshot(self, window: Window, reroutes: Mapping[str, tuple[Target, ...]]) -> EngineStatistics:
        dests = {
            name: DestinationStatistics(
                name,
                int(d.cwnd),
                d.connections,
                len(d.cache),
                d.in_flight,
                d.queued,
                d.delivered,
                d.deferred,
                d.bounced,
                d.expired,
                d.held,
                ", ".join(t.label for t in reroutes[name]) if name in reroutes else None,
            )
            for name, d in window.dests.items()
        }
        t = self.counts
        return EngineStatistics(
            window.limit,
            window.claimed,
            t["delivered"],
            t["deferred"],
            t["bounced"],
            t["expired"],
            t["held"],
            t["dsns"],
            MappingProxyType(dests),
        )
