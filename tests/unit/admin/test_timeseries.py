"""The chart data: per-minute samples in metrics.db, deltas of the mail tally, bounded to 25 h."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from backupmx.admin.mailevents import MailTally
from backupmx.admin.timeseries import KEEP_SECONDS, SeriesPoint, SeriesSampler, SeriesStore, rates
from backupmx.clock import FakeClock
from backupmx.spool import DomainStats, SpoolStats


class Stats:
    def __init__(self) -> None:
        self.by_domain: dict[str, dict[str, int]] = {}

    async def stats(self) -> SpoolStats:
        return SpoolStats(0, {}, tuple(DomainStats(d, s) for d, s in self.by_domain.items()), None, 0, 0)


async def test_sampler_records_depth_and_per_minute_deltas(tmp_path: Path) -> None:
    clock = FakeClock(1_700_000_000.0)
    store = SeriesStore(tmp_path / "metrics.db")
    store.open()
    tally = MailTally(["example.test"])
    spool = Stats()
    sampler = SeriesSampler(store, spool, tally, ["example.test"], clock)
    tally.listener("queued", {"to": "<a@example.test>,<b@example.test>"})
    spool.by_domain["example.test"] = {"queued": 2}
    await sampler.sample()
    clock.advance(60)
    tally.listener("delivered", {"to": "<a@example.test>", "reply": "250 2.0.0 ok"})
    tally.listener("deferred", {"to": "<b@example.test>", "reply": "451 4.4.1 no"})
    spool.by_domain["example.test"] = {"queued": 1, "held": 3}
    await sampler.sample()
    pts = store.points("example.test")
    assert [(p.queued, p.held, p.arrived, p.delivered, p.deferred) for p in pts] == [(2, 0, 2, 0, 0), (1, 3, 0, 1, 1)]
    assert pts[1].at - pts[0].at == 60 and pts[1].depth == 4
    r = rates(pts, now=clock.now())
    assert r is not None and r.arrivals_per_minute == 1.0 and r.deliveries_per_minute == 0.5
    store.close()


def test_store_is_bounded_and_a_second_sample_in_a_minute_adds(tmp_path: Path) -> None:
    store = SeriesStore(tmp_path / "metrics.db")
    store.open()
    t0 = 1_700_000_000.0
    for i in range(30 * 60):  # 30 hours of minutes
        store.add([SeriesPoint(t0 + i * 60, "example.test", i, 0, 1, 1, 0, 0)], now=t0 + i * 60)
    now = t0 + (30 * 60 - 1) * 60
    assert store.row_count() <= KEEP_SECONDS / 60 + 1
    assert min(p.at for p in store.points()) >= now - KEEP_SECONDS
    store.add([SeriesPoint(now, "example.test", 7, 0, 2, 0, 0, 0)], now=now)
    last = store.points("example.test", since=now)[0]
    assert (last.queued, last.arrived, last.delivered) == (7, 3, 1)
    store.close()
    mode = sqlite3.connect(tmp_path / "metrics.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
