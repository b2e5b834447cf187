"""Grants, one-time links and sessions in the spool's kv (tokens.py, grants.py): signatures, expiry,
single use across store objects (a restart, another node) and under concurrency, revocation."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backupmx.clock import FakeClock
from backupmx.continuity.grants import NS_GRANT, NS_INDEX, AccessStore, GrantError, subject_of
from backupmx.continuity.tokens import LinkClaims, LinkRefused, Refusal, Signer, load_secret
from backupmx.spool import KV_LIST_MAX
from backupmx.spool.sqlite import SqliteSpool

SECRET = bytes(range(32))


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    s = SqliteSpool(tmp_path / "data", node="n1", clock=FakeClock())
    await s.open()
    yield s
    await s.close()


def store(spool: SqliteSpool, clock: FakeClock, secret: bytes = SECRET) -> AccessStore:
    spool.clock = clock  # kv expiry follows the same clock
    return AccessStore(spool, Signer(secret), clock)


def test_secret_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "d" / "continuity.key"
    a = load_secret(path)
    assert len(a) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_secret(path) == a
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        load_secret(path)


def test_links_are_signed_and_expire() -> None:
    s = Signer(SECRET)
    token = s.sign_link(LinkClaims("id1", "alice@example.test", "g1", 1000.0))
    assert s.verify_link(token, now=999.0).address == "alice@example.test"
    with pytest.raises(LinkRefused) as e:
        s.verify_link(token, now=1000.0)
    assert e.value.reason is Refusal.EXPIRED
    with pytest.raises(LinkRefused) as e:
        Signer(bytes(32)).verify_link(token, now=1.0)  # another installation's secret
    assert e.value.reason is Refusal.INVALID


def test_message_tokens_depend_on_message_and_identity() -> None:
    s = Signer(SECRET)
    a = s.message_token("1K11FNWPJ26GFT", "alice@example.test")
    assert len(a) == 22
    assert a == s.message_token("1K11FNWPJ26GFT", "Alice@Example.TEST")
    assert a != s.message_token("1K11FNWPJ26GFT", "bob@example.test")
    assert a != s.message_token("1K11FNWPJ26GFV", "alice@example.test")
    assert s.message_token_ok("1K11FNWPJ26GFT", "alice@example.test", a)
    assert not s.message_token_ok("1K11FNWPJ26GFT", "bob@example.test", a)


def test_subjects() -> None:
    assert subject_of(" Alice@Example.TEST ") == "alice@example.test"
    assert subject_of("example.test", domain=True) == "@example.test"
    for bad in ("alice", "@example.test", "a@b@c", "alice@"):
        with pytest.raises(GrantError):
            subject_of(bad)


async def test_a_link_is_redeemed_once_even_by_another_store_and_concurrently(spool: SqliteSpool) -> None:
    clock = FakeClock()
    a = store(spool, clock)
    await a.grant("alice@example.test", expires_at=clock.now() + 86400, by="t")
    link = await a.issue_link("alice@example.test", ttl=600)
    session, cookie = await a.redeem(link.token, session_ttl=3600)
    assert session.address == "alice@example.test" and (await a.session(cookie)) == session
    b = store(spool, clock)  # another process or node on the same spool
    with pytest.raises(LinkRefused) as e:
        await b.redeem(link.token, session_ttl=3600)
    assert e.value.reason is Refusal.USED
    # two redemptions at once: exactly one wins
    link2 = await a.issue_link("alice@example.test", ttl=600)
    results = await asyncio.gather(
        a.redeem(link2.token, session_ttl=60), b.redeem(link2.token, session_ttl=60), return_exceptions=True
    )
    assert sum(isinstance(r, tuple) for r in results) == 1
    assert sum(isinstance(r, LinkRefused) and r.reason is Refusal.USED for r in results) == 1


async def test_sessions_end_with_their_ttl_or_their_grant(spool: SqliteSpool) -> None:
    clock = FakeClock()
    a = store(spool, clock)
    await a.grant("alice@example.test", expires_at=clock.now() + 7200, by="t")
    _, cookie = await a.redeem((await a.issue_link("alice@example.test", ttl=600)).token, session_ttl=3600)
    clock.advance(3601)
    assert await a.session(cookie) is None
    _, cookie = await a.redeem((await a.issue_link("alice@example.test", ttl=600)).token, session_ttl=86400)
    s = await a.session(cookie)
    assert s is not None and s.expires_at == clock.now() - 3601 + 7200  # capped by the grant
    # a new grant (renewal) replaces the old one: its sessions and links end
    old_link = await a.issue_link("alice@example.test", ttl=600)
    await a.grant("alice@example.test", expires_at=clock.now() + 86400, by="t")
    assert await a.session(cookie) is None
    with pytest.raises(LinkRefused) as e:
        await a.redeem(old_link.token, session_ttl=60)
    assert e.value.reason is Refusal.REVOKED


async def test_a_domain_grant_covers_its_recipients_and_is_listed(spool: SqliteSpool) -> None:
    clock = FakeClock()
    a = store(spool, clock)
    with pytest.raises(GrantError, match="no access grant"):
        await a.issue_link("carol@example.test", ttl=60)
    await a.grant("@example.test", expires_at=clock.now() + 600, by="t")
    await a.grant("zed@example.test", expires_at=clock.now() + 60, by="t")
    link = await a.issue_link("carol@example.test", ttl=6000)
    assert link.expires_at == clock.now() + 600  # never past the grant
    _, cookie = await a.redeem(link.token, session_ttl=3600)
    assert [g.subject for g in await a.grants()] == ["@example.test", "zed@example.test"]
    clock.advance(61)
    assert [g.subject for g in await a.grants()] == ["@example.test"]
    assert await a.revoke("@example.test")
    assert await a.session(cookie) is None
    assert await a.grants() == []


async def test_links_signed_with_another_secret_do_not_work(spool: SqliteSpool) -> None:
    clock = FakeClock()
    a = store(spool, clock)
    await a.grant("alice@example.test", expires_at=clock.now() + 600, by="t")
    link = await a.issue_link("alice@example.test", ttl=60)
    other = store(spool, clock, secret=bytes(reversed(SECRET)))
    with pytest.raises(LinkRefused) as e:
        await other.redeem(link.token, session_ttl=60)
    assert e.value.reason is Refusal.INVALID


async def test_grants_kept_by_an_older_version_are_listed(spool: SqliteSpool) -> None:
    """Older versions kept a JSON index of subjects beside the grants; the grants alone are listed now,
    so an installation's grants stay listed after the upgrade, and a subject only the index named is not."""
    clock = FakeClock()
    a = store(spool, clock)
    for subject, g_id in (("bob@example.test", "g1"), ("@other.test", "g2")):
        doc = {"subject": subject, "id": g_id, "created_at": clock.now(), "expires_at": clock.now() + 600, "by": "old"}
        await spool.kv_put(NS_GRANT, subject, json.dumps(doc).encode(), expires_at=clock.now() + 600)
    await spool.kv_put(NS_INDEX, "grants", json.dumps(["@other.test", "bob@example.test", "gone@x.test"]).encode())
    assert [(g.subject, g.id) for g in await a.grants()] == [("bob@example.test", "g1"), ("@other.test", "g2")]
    await a.grant("carol@example.test", expires_at=clock.now() + 60, by="t")
    await a.revoke("@other.test")
    assert [g.subject for g in await a.grants()] == ["bob@example.test", "carol@example.test"]


async def test_every_grant_is_listed_past_one_page(spool: SqliteSpool) -> None:
    clock = FakeClock()
    a = store(spool, clock)
    subjects = [f"u{n:04d}@example.test" for n in range(KV_LIST_MAX + 3)]
    for s in subjects:
        await a.grant(s, expires_at=clock.now() + 600, by="t")
    assert [g.subject for g in await a.grants()] == subjects
