"""Watching the primaries: health state per protected domain (probe.py), the canary through our own
path (canary.py) and alerts (alerts.py). This module holds the shared value types that delivery, the
admin API, metrics and the CLI read; they import nothing of ours."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class DestinationState(StrEnum):
    UNKNOWN = "unknown"  # not probed yet
    UP = "up"
    DOWN = "down"  # consecutive probe failures >= delivery.down_after: an outage is declared
    RECOVERING = "recovering"  # answered again after DOWN; deliveries resume with slow start


@dataclass(frozen=True, slots=True)
class DestinationStatus:
    """An immutable snapshot of one protected domain's primary, for the API, metrics and status."""

    domain: str
    state: DestinationState
    since: float  # when the current state began
    outage_since: float | None  # start of the declared outage (None when none is declared)
    recovered_at: float | None  # end of the last declared outage (the recovery guard counts from it)
    last_probe_at: float | None
    last_error: str | None  # why the last probe failed (connect refused, timeout, 421 ...)
    consecutive_failures: int
    target: str = ""  # host:port the last probe reached or tried

    @property
    def outage_declared(self) -> bool:
        return self.outage_since is not None


# What the monitor and the recipient verifier need from routing; backupmx.delivery.route.RouteResolver
# fits (configured primaries, or MX hosts better than us). Protocols, so neither imports delivery.
class TargetLike(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def address(self) -> str | None: ...
    @property
    def label(self) -> str: ...


class RouteLike(Protocol):
    @property
    def targets(self) -> Sequence[TargetLike]: ...


class RouteLookup(Protocol):
    async def resolve(self, domain: str) -> RouteLike: ...
