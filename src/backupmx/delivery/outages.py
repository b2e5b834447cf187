"""The declared outages of each protected destination, read from the spool and kept for a short while
(retention pauses during them; see retention.py). A read that fails falls back to what was known."""

from __future__ import annotations

import logging
import time

from backupmx.config import Config
from backupmx.spool import OutagePeriod, Spool

log = logging.getLogger("backupmx.delivery")

OUTAGE_CACHE_TTL = 30.0


class OutageCache:
    def __init__(self, config: Config, spool: Spool) -> None:
        self._config = config
        self._spool = spool
        self._cache: dict[str, tuple[float, list[OutagePeriod]]] = {}  # protected domains only

    async def get(self, domain: str, *, fresh: bool = False) -> list[OutagePeriod]:
        if self._config.domain(domain) is None:
            return []
        cached = self._cache.get(domain)
        mono = time.monotonic()
        if cached is not None and not fresh and mono - cached[0] < OUTAGE_CACHE_TTL:
            return cached[1]
        try:
            periods = await self._spool.outages(domain)
        except Exception:
            log.exception("reading outages of %s", domain)
            return cached[1] if cached else []
        self._cache[domain] = (mono, periods)
        return periods

    def forget(self, domain: str) -> None:
        self._cache.pop(domain, None)
