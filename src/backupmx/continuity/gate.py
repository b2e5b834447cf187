"""When the emergency inbox of a domain is open: while an outage of its primary is declared, unless the
operator closed it, or whenever the operator opened it by hand (`backupmx continuity open|close|auto`).

The operator's choice is kept in the spool's kv (every node and the running `serve` see it); the outage
comes from the health monitor in `serve` (HealthMonitor.snapshot()) or from the spool's declared
outages in the CLI. Answers are cached for `cache_seconds` so a busy inbox does not query the spool on
every request. A spool error is not caught here: the inbox answers 503 and stays shut."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from backupmx.clock import Clock
from backupmx.monitor import DestinationStatus
from backupmx.spool import KvStore, OutagePeriod

NS_MODE = "continuity.mode"  # key: domain; value {"mode": "open"|"closed", "by", "at"}


class Mode(StrEnum):
    AUTO = "auto"  # open while an outage is declared (the default: no kv record)
    OPEN = "open"  # opened by hand
    CLOSED = "closed"  # closed by hand, even during an outage


class HealthSnapshot(Protocol):
    """The health monitor, as far as the gate reads it (backupmx.monitor.probe.HealthMonitor fits)."""

    def snapshot(self) -> Mapping[str, DestinationStatus]: ...


class OutageSource(Protocol):
    async def outage_since(self, domain: str) -> float | None: ...


class MonitorOutages:
    def __init__(self, health: HealthSnapshot) -> None:
        self.health = health

    async def outage_since(self, domain: str) -> float | None:
        st = self.health.snapshot().get(domain)
        return st.outage_since if st is not None else None


class OutagesList(Protocol):
    async def outages(self, domain: str | None = None, *, since: float = 0.0) -> list[OutagePeriod]: ...


class SpoolOutages:
    """Declared outages as the spool records them (for the CLI, which has no health monitor)."""

    def __init__(self, spool: OutagesList) -> None:
        self.spool = spool

    async def outage_since(self, domain: str) -> float | None:
        for o in await self.spool.outages(domain):
            if o.ended_at is None:
                return o.started_at
        return None


@dataclass(frozen=True, slots=True)
class GateState:
    domain: str
    open: bool
    mode: Mode
    outage_since: float | None  # a declared outage, whatever the mode
    changed_by: str | None = None
    changed_at: float | None = None


class Gate:
    def __init__(
        self, kv: KvStore, outages: OutageSource, clock: Clock, domains: list[str], *, cache_seconds: float = 1.0
    ) -> None:
        self.kv = kv
        self.outages = outages
        self.clock = clock
        self.domains = sorted(domains)
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, GateState]] = {}

    async def state(self, domain: str) -> GateState:
        domain = domain.lower()
        now = self.clock.now()
        hit = self._cache.get(domain)
        if hit is not None and now - hit[0] < self.cache_seconds:
            return hit[1]
        since = await self.outages.outage_since(domain) if domain in self.domains else None
        mode, by, at = Mode.AUTO, None, None
        raw = await self.kv.kv_get(NS_MODE, domain)
        if raw is not None:
            try:
                doc = json.loads(raw)
                mode, by, at = Mode(doc["mode"]), doc.get("by"), doc.get("at")
            except (ValueError, KeyError, TypeError):
                mode = Mode.AUTO
        is_open = domain in self.domains and (mode is Mode.OPEN or (mode is Mode.AUTO and since is not None))
        st = GateState(domain, is_open, mode, since, by, at)
        self._cache[domain] = (now, st)
        return st

    async def open_domains(self) -> list[GateState]:
        return [st for d in self.domains if (st := await self.state(d)).open]

    async def set_mode(self, domain: str, mode: Mode, *, by: str) -> None:
        domain = domain.lower()
        if mode is Mode.AUTO:
            await self.kv.kv_delete(NS_MODE, domain)
        else:
            doc = {"mode": mode.value, "by": by, "at": self.clock.now()}
            await self.kv.kv_put(NS_MODE, domain, json.dumps(doc).encode())
        self._cache.pop(domain, None)
