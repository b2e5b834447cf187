"""The learned set's listing (policy/learned.py, `backupmx recipients list`): paging follows the raw kv rows,
so a damaged row is skipped (and counted) but never ends the listing early."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backupmx.cli import recipients as recipients_cli
from backupmx.clock import FakeClock
from backupmx.config import config_from_dict
from backupmx.policy.learned import NAMESPACE, LearnedRecipient, LearnedRecipients, Source, learned_key
from backupmx.spool.sqlite import SqliteSpool

PAGE = 4
VALID = [f"user{i:02d}@ours.test" for i in range(11)]  # almost three pages of 4


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LearnedRecipients]:
    spool = SqliteSpool(tmp_path / "data", clock=FakeClock())
    await spool.open()
    try:
        s = LearnedRecipients(spool)
        for address in VALID:
            await s.put(LearnedRecipient(address, True, Source.OPERATOR, 1000.0, None))
        # damaged rows in the first page: not JSON, and JSON for an address that is not its key
        await spool.kv_put(NAMESPACE, "ours.test/user00a", b"\x00not json")
        wrong = LearnedRecipient("someone@else.test", True, Source.OPERATOR, 1000.0, None)
        await spool.kv_put(NAMESPACE, "ours.test/user01a", recipients_json(wrong))
        await s.put(LearnedRecipient("other@else.test", True, Source.OPERATOR, 1000.0, None))  # another domain
        yield s
    finally:
        await spool.close()


def recipients_json(e: LearnedRecipient) -> bytes:
    return json.dumps({"a": e.address, "k": e.known, "s": e.source, "at": e.learned_at, "exp": None}).encode()


async def test_pages_follow_raw_keys_past_damaged_rows(store: LearnedRecipients) -> None:
    first = await store.page("ours.test", limit=PAGE)
    assert [e.address for e in first.entries] == ["user00@ours.test", "user01@ours.test"]
    assert first.damaged == 2
    assert first.next == learned_key("user01a@ours.test")  # the last raw key, not the last good address
    pages = [p async for p in store.pages("ours.test", limit=PAGE)]
    assert len(pages) == 4  # 13 rows: 4 + 4 + 4 + 1
    assert pages[-1].next is None
    assert [e.address for p in pages for e in p.entries] == VALID
    assert sum(p.damaged for p in pages) == 2
    assert [e.address for e in await store.list("ours.test")] == VALID


async def test_a_full_last_page_ends_with_an_empty_one(store: LearnedRecipients) -> None:
    pages = [p async for p in store.pages("ours.test", limit=13)]
    assert [(len(p.entries), p.damaged) for p in pages] == [(11, 2), (0, 0)]


async def test_recipients_list_shows_every_valid_entry(
    store: LearnedRecipients, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(recipients_cli, "PAGE", PAGE)
    cfg = config_from_dict(
        {
            "server": {"hostname": "backup.example.net", "listen": ["127.0.0.1:2525"], "data_dir": "/nonexistent"},
            "domains": [{"name": "ours.test", "primary": ["127.0.0.1:25"], "recipients": "verify"}],
        }
    )
    args = argparse.Namespace(domain="ours.test", json=True)
    assert await recipients_cli.cmd_list(args, cfg, store) == recipients_cli.EXIT_OK
    out, err = capsys.readouterr()
    learned = json.loads(out)["domains"]["ours.test"]["learned"]
    assert [e["address"] for e in learned] == VALID
    assert err.splitlines() == ["backupmx: recipients list: 2 damaged entries skipped"]

    args = argparse.Namespace(domain=None, json=False)
    assert await recipients_cli.cmd_list(args, cfg, store) == recipients_cli.EXIT_OK
    out, err = capsys.readouterr()
    assert "ours.test: verify, 11 learned" in out
    assert all(a in out for a in VALID)
    assert err.count("damaged") == 1


async def test_recipients_list_shows_the_recovery_guard(
    store: LearnedRecipients, capsys: pytest.CaptureFixture[str]
) -> None:
    """After an outage, within delivery.recovery_guard, a probe's 5.1.1 is answered 450: `list` says so."""
    import time

    from backupmx.spool import OutagePeriod

    cfg = config_from_dict(
        {
            "domains": [{"name": "ours.test", "primary": ["127.0.0.1:25"], "recipients": "verify"}],
            "delivery": {"recovery_guard": "6h"},
        }
    )
    now = time.time()

    async def recent() -> list[OutagePeriod]:
        return [OutagePeriod("ours.test", now - 7200, now - 3600), OutagePeriod("other.test", now - 60, now - 30)]

    async def long_ago() -> list[OutagePeriod]:
        return [OutagePeriod("ours.test", now - 90000, now - 86400)]

    args = argparse.Namespace(domain="ours.test", json=False)
    assert await recipients_cli.cmd_list(args, cfg, store, outages=recent) == recipients_cli.EXIT_OK
    out = capsys.readouterr().out
    assert "a probe's 5.1.1 is answered 450 4.1.1, not 550" in out
    assert (
        await recipients_cli.cmd_list(argparse.Namespace(domain="ours.test", json=True), cfg, store, outages=long_ago)
        == recipients_cli.EXIT_OK
    )
    assert json.loads(capsys.readouterr().out)["domains"]["ours.test"]["recovery_guard_until"] is None
