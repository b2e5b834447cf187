"""The small time series behind the dashboard's charts: once a minute, per protected domain, the queue
depth (queued and held recipients, from `Spool.stats`) and how many recipients arrived, were delivered,
deferred or bounced during that minute (from the mail log, through `MailTally`).

It lives in its own SQLite file, `data_dir/metrics.db` (WAL), apart from the spool: losing it loses
charts, never mail, and it works the same whichever spool backend runs. It is bounded: rows older than
`keep_seconds` (25 h) are deleted at each sample. A failed sample is logged and skipped, never raised.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from backupmx.admin.mailevents import CounterKey, MailEvent, MailTally
from backupmx.clock import Clock
from backupmx.privatefiles import create_private_file, tighten
from backupmx.spool import SpoolStats

log = logging.getLogger("backupmx.admin")

SAMPLE_SECONDS = 60.0
KEEP_SECONDS = 25 * 3600.0  # 24 h of charts, plus a bit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS metrics_series (
    ts        INTEGER NOT NULL,  -- start of the sample's minute, epoch seconds
    domain    TEXT    NOT NULL,
    queued    INTEGER NOT NULL,  -- recipients QUEUED at the sample
    held      INTEGER NOT NULL,  -- recipients HELD at the sample
    arrived   INTEGER NOT NULL,  -- recipients accepted during the minute
    delivered INTEGER NOT NULL,
    deferred  INTEGER NOT NULL,
    bounced   INTEGER NOT NULL,  -- bounced or expired
    PRIMARY KEY (ts, domain)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    at: float
    domain: str
    queued: int
    held: int
    arrived: int
    delivered: int
    deferred: int
    bounced: int

    @property
    def depth(self) -> int:
        return self.queued + self.held


class SeriesStore:
    """`metrics_series` in its own SQLite file; thread-safe (calls run in a worker thread)."""

    def __init__(self, path: Path, *, keep_seconds: float = KEEP_SECONDS) -> None:
        self.path = path
        self.keep_seconds = keep_seconds
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        with self._lock:
            if self._db is not None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            create_private_file(self.path)  # SQLite gives -wal and -shm the database file's mode
            for side in ("-wal", "-shm"):  # made 0644 by versions before this one
                tighten(self.path.with_name(self.path.name + side))
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # charts, not mail: a lost last minute is fine
            db.executescript(_SCHEMA)
            self._db = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("SeriesStore is not open")
        return self._db

    def add(self, points: Sequence[SeriesPoint], *, now: float) -> None:
        """Store one sample (a second sample in the same minute adds its counts) and drop old rows."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN")
            try:
                db.executemany(
                    """INSERT INTO metrics_series VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT (ts, domain) DO UPDATE SET
                         queued = excluded.queued, held = excluded.held,
                         arrived = arrived + excluded.arrived, delivered = delivered + excluded.delivered,
                         deferred = deferred + excluded.deferred, bounced = bounced + excluded.bounced""",
                    [
                        (int(p.at), p.domain, p.queued, p.held, p.arrived, p.delivered, p.deferred, p.bounced)
                        for p in points
                    ],
                )
                db.execute("DELETE FROM metrics_series WHERE ts < ?", (int(now - self.keep_seconds),))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def points(self, domain: str | None = None, *, since: float = 0.0) -> list[SeriesPoint]:
        with self._lock:
            db = self._conn()
            if domain is None:
                rows = db.execute(
                    "SELECT * FROM metrics_series WHERE ts >= ? ORDER BY ts, domain", (int(since),)
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM metrics_series WHERE domain = ? AND ts >= ? ORDER BY ts", (domain, int(since))
                ).fetchall()
        return [SeriesPoint(float(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows]

    def row_count(self) -> int:
        with self._lock:
            return int(self._conn().execute("SELECT count(*) FROM metrics_series").fetchone()[0])


@dataclass(frozen=True, slots=True)
class Rates:
    """Recipients per minute over the last `window_seconds` of samples."""

    arrivals_per_minute: float
    deliveries_per_minute: float
    window_seconds: float


def rates(points: Sequence[SeriesPoint], *, now: float, window_seconds: float = 900.0) -> Rates | None:
    """Average rates over the samples within the window; None when there are none yet."""
    recent = [p for p in points if p.at >= now - window_seconds]
    if not recent:
        return None
    minutes = max(1.0, len({p.at for p in recent}) * SAMPLE_SECONDS / 60.0)
    return Rates(sum(p.arrived for p in recent) / minutes, sum(p.delivered for p in recent) / minutes, window_seconds)


class StatsSource(Protocol):
    """What the sampler reads: the spool's `stats()`."""

    async def stats(self) -> SpoolStats: ...


class SeriesSampler:
    """Takes one sample a minute from the spool and the mail tally into the store."""

    def __init__(
        self,
        store: SeriesStore,
        spool: StatsSource,
        tally: MailTally,
        domains: Iterable[str],
        clock: Clock,
        *,
        interval: float = SAMPLE_SECONDS,
    ) -> None:
        self.store = store
        self.spool = spool
        self.tally = tally
        self.domains = tuple(domains)
        self.clock = clock
        self.interval = interval
        self._last_counts: dict[CounterKey, int] = tally.counts()
        self.last_sample_at: float | None = None

    async def sample(self) -> list[SeriesPoint]:
        stats = await self.spool.stats()
        now = self.clock.now()
        counts = self.tally.counts()
        delta: dict[tuple[MailEvent, str], int] = {}
        for key, n in counts.items():
            d = n - self._last_counts.get(key, 0)
            if d:
                delta[(key[0], key[1])] = delta.get((key[0], key[1]), 0) + d
        self._last_counts = counts
        by_domain = {d.domain: d for d in stats.domains}
        at = now - (now % SAMPLE_SECONDS)
        points = []
        for name in self.domains:
            ds = by_domain.get(name)
            by_state = ds.by_state if ds else {}
            points.append(
                SeriesPoint(
                    at=at,
                    domain=name,
                    queued=by_state.get("queued", 0),
                    held=by_state.get("held", 0),
                    arrived=delta.get((MailEvent.ACCEPTED, name), 0),
                    delivered=delta.get((MailEvent.DELIVERED, name), 0),
                    deferred=delta.get((MailEvent.DEFERRED, name), 0),
                    bounced=delta.get((MailEvent.BOUNCED, name), 0) + delta.get((MailEvent.EXPIRED, name), 0),
                )
            )
        await asyncio.to_thread(self.store.add, points, now=now)
        self.last_sample_at = now
        return points

    async def run(self) -> None:
        """Sample at each interval boundary until cancelled; a failed sample is logged and skipped."""
        while True:
            now = self.clock.now()
            await self.clock.sleep(self.interval - (now % self.interval) or self.interval)
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # charts must never take the node down
                log.warning("metrics sample failed: %s", e)
