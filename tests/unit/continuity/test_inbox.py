"""The emergency inbox over HTTP (aiohttp client, real spool): closed unless open, sign-in once,
scoped to the signed identity, read-only, and the headers that keep mail content harmless."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from backupmx.continuity.audit import AuditLog
from backupmx.continuity.inbox import COOKIE
from backupmx.model import Bounced, Delivered, RecipientState
from backupmx.reply import Reply
from backupmx.spool import RecipientUpdate
from tests.unit.continuity import mail
from tests.unit.continuity.harness import put, running_inbox

PATHS = ("/", "/signin?t=x", "/m/0000000000000A/AAAAAAAAAAAAAAAAAAAAAA", "/nope")


def urls(html: str) -> list[str]:
    return re.findall(r'href="(/m/[0-9A-Z]{14}/[A-Za-z0-9_-]{22})"', html)


async def test_closed_while_no_outage_and_not_opened(tmp_path: Path) -> None:
    async with running_inbox(tmp_path) as inbox:
        token = await inbox.link("alice@example.test")
        c = inbox.client()
        for path in (*PATHS, f"/signin?t={token}"):
            async with c.get(inbox.url + path) as r:
                assert r.status == 403, path
                page = await r.text()
                assert "The emergency inbox is closed" in page and "only while the mail service is down" in page
        async with c.post(inbox.url + "/signin", data={"t": token}) as r:
            assert r.status == 403
        async with c.get(inbox.url + "/static/inbox.css") as r:  # the closed page's own stylesheet
            assert r.status == 200
        # the link was not spent by those refusals
        inbox.open()
        async with c.post(inbox.url + "/signin", data={"t": token}, allow_redirects=False) as r:
            assert r.status == 303


async def test_operator_opens_and_closes_by_hand(tmp_path: Path) -> None:
    from backupmx.continuity.gate import Mode

    async with running_inbox(tmp_path) as inbox:
        c = inbox.client()
        gate = inbox.server.gate
        await gate.set_mode("example.test", Mode.OPEN, by="test")
        async with c.get(inbox.url + "/") as r:
            assert r.status == 401  # open: now it asks for a link
        inbox.open()
        await gate.set_mode("example.test", Mode.CLOSED, by="test")  # closed by hand even during an outage
        async with c.get(inbox.url + "/") as r:
            assert r.status == 403
        await gate.set_mode("example.test", Mode.AUTO, by="test")
        async with c.get(inbox.url + "/") as r:
            assert r.status == 401


async def test_a_domain_not_open_refuses_its_people_even_when_another_is_open(tmp_path: Path) -> None:
    async with running_inbox(tmp_path) as inbox:
        inbox.open("example.test")
        token = await inbox.link("carol@other.test")
        c = inbox.client()
        async with c.get(inbox.url + f"/signin?t={token}") as r:
            assert r.status == 403 and "closed" in await r.text()
        alice = await inbox.sign_in("alice@example.test")
        inbox.close("example.test")
        inbox.open("other.test")
        async with alice.get(inbox.url + "/") as r:
            assert r.status == 403


async def test_sign_in_once_then_see_only_held_mail_of_your_own(tmp_path: Path) -> None:
    async with running_inbox(tmp_path) as inbox:
        inbox.open()
        s = inbox.spool
        q_alice = await put(s, ["alice@example.test"], mail.plain(subject="For Alice only"))
        q_both = await put(s, ["alice@example.test", "bob@example.test"], mail.plain(subject="For both"))
        q_bob = await put(s, ["bob@example.test"], mail.plain(to="bob@example.test", subject="For Bob only"))
        await put(s, ["xalice@example.test"], mail.plain(subject="Substring trap"))  # filter is a substring
        await put(s, ["alice@example.test.evil"], mail.plain(subject="Foreign domain"))
        q_done = await put(s, ["alice@example.test", "bob@example.test"], mail.plain(subject="Delivered to Alice"))
        claims = await s.claim_due(now=inbox.clock.now() + 1, owner="t", lease_seconds=60, limit=100)
        ok = Reply(250, "2.0.0", "ok")
        await s.record(
            "t",
            [
                RecipientUpdate(c.message.id, r.index, Delivered(ok))
                for c in claims
                for r in c.recipients
                if c.message.id == q_done and r.address == "alice@example.test"
            ],
            now=inbox.clock.now(),
        )
        await s.release([c for c in claims])
        alice = await inbox.sign_in("alice@example.test")
        async with alice.get(inbox.url + "/") as r:
            page = await r.text()
        assert r.status == 200
        assert "For Alice only" in page and "For both" in page
        for absent in ("For Bob only", "Substring trap", "Foreign domain", "Delivered to Alice"):
            assert absent not in page
        assert "2 messages" in page
        assert page.index("For both") < page.index("For Alice only")  # newest first
        mine = urls(page)
        assert {u.split("/")[2] for u in mine} == {q_alice, q_both}
        # every held message opens; bob's, and a message already delivered to Alice, do not
        for u in mine:
            async with alice.get(inbox.url + u) as r:
                assert r.status == 200
        bob = await inbox.sign_in("bob@example.test")
        async with bob.get(inbox.url + "/") as r:
            bob_urls = urls(await r.text())
        bob_url = next(u for u in bob_urls if q_bob in u)
        shared_for_bob = next(u for u in bob_urls if q_both in u)
        assert shared_for_bob not in mine  # the same message has another URL for another person
        for u in (
            bob_url,
            shared_for_bob,  # bob's own URLs, leaked to alice
            f"/m/{q_bob}/{mine[0].split('/')[3]}",  # bob's ID with alice's token of another message
            f"/m/{q_done}/{inbox.server.signer.message_token(q_done, 'alice@example.test')}",
        ):
            for suffix in ("", "/frame", "/eml", "/part/1"):
                async with alice.get(inbox.url + u + suffix) as r:
                    assert r.status == 404, u + suffix
                    assert "For Bob only" not in await r.text()
        events = [e.event for e in AuditLog(inbox.config.server.data_dir / "continuity-audit.log").read()]
        assert events.count("signin") == 2 and "view-refused" in events and "view" in events


async def test_a_link_works_once_even_across_a_restart_and_not_when_expired(tmp_path: Path) -> None:
    from backupmx.clock import FakeClock

    clock = FakeClock(1_795_000_000.0)
    async with running_inbox(tmp_path, clock=clock) as inbox:
        inbox.open()
        token = await inbox.link("alice@example.test")
        short = await inbox.link("alice@example.test", ttl=30)
        c = inbox.client()
        async with c.get(inbox.url + f"/signin?t={token}") as r:  # the page only: nothing spent
            assert r.status == 200 and "Sign in" in await r.text()
        async with c.post(inbox.url + "/signin", data={"t": token}, allow_redirects=False) as r:
            assert r.status == 303
        clock.advance(31)
        c2 = inbox.client()
        async with c2.post(inbox.url + "/signin", data={"t": short}) as r:
            assert r.status == 403 and "has expired" in await r.text()
    async with running_inbox(tmp_path, clock=clock) as again:  # the same data_dir: a restart
        again.open()
        c3 = again.client()
        for method in ("get", "post"):
            req = (
                c3.get(again.url + f"/signin?t={token}")
                if method == "get"
                else c3.post(again.url + "/signin", data={"t": token})
            )
            async with req as r:
                assert r.status == 403
                assert "already been used" in await r.text()
        assert not any(m.key == COOKIE for m in c3.cookie_jar)


async def test_forged_and_tampered_links_are_refused(tmp_path: Path) -> None:
    async with running_inbox(tmp_path) as inbox:
        inbox.open()
        token = await inbox.link("alice@example.test")
        prefix, body, mac = token.split(".")
        import base64
        import json

        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        claims["a"] = "bob@example.test"
        forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        c = inbox.client()
        for bad in (f"{prefix}.{forged_body}.{mac}", token[:-2] + "AA", "v1.x.y", "", "a" * 5000):
            async with c.post(inbox.url + "/signin", data={"t": bad}) as r:
                assert r.status == 403
                assert "not valid" in await r.text()


async def test_revoking_ends_sessions_and_links_at_once(tmp_path: Path) -> None:
    async with running_inbox(tmp_path) as inbox:
        inbox.open()
        await put(inbox.spool, ["alice@example.test"], mail.plain())
        alice = await inbox.sign_in("alice@example.test")
        spare = await inbox.link("alice@example.test")
        assert await inbox.server.access.revoke("alice@example.test")
        async with alice.get(inbox.url + "/") as r:
            assert r.status == 401
        async with inbox.client().post(inbox.url + "/signin", data={"t": spare}) as r:
            assert r.status == 403 and "withdrawn" in await r.text()


async def test_the_views_never_change_the_queue(tmp_path: Path) -> None:
    async with running_inbox(tmp_path) as inbox:
        inbox.open()
        qid = await put(inbox.spool, ["alice@example.test"], mail.multipart())
        before = await inbox.spool.get(qid)
        alice = await inbox.sign_in("alice@example.test")
        async with alice.get(inbox.url + "/") as r:
            (url,) = urls(await r.text())
        async with alice.get(inbox.url + url) as r:
            parts = re.findall(r'/part/(\d+)"', await r.text())
        assert len(parts) == 2
        for suffix in ("", "?view=text", "/frame", "/eml", *(f"/part/{n}" for n in parts)):
            async with alice.get(inbox.url + url + suffix) as r:
                assert r.status == 200, suffix
                await r.read()
        for method in ("post", "put", "delete"):
            async with getattr(alice, method)(inbox.url + url) as r:
                assert r.status == 405
        after = await inbox.spool.get(qid)
        assert after == before
        assert {r.state for r in after.recipients} == {RecipientState.QUEUED}


async def test_message_page_frame_and_downloads_are_locked_down(tmp_path: Path) -> None:
    async with running_inbox(tmp_path) as inbox:
        inbox.open()
        body = mail.multipart()
        qid = await put(inbox.spool, ["alice@example.test"], body)
        alice = await inbox.sign_in("alice@example.test")
        url = f"/m/{qid}/{inbox.server.signer.message_token(qid, 'alice@example.test')}"
        async with alice.get(inbox.url + url) as r:
            page = await r.text()
            csp = r.headers["Content-Security-Policy"]
            assert "script-src" not in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
            assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"
        assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in page and "allow-scripts" not in page
        assert "contract 2026.pdf" in page and "요약.txt" in page
        async with alice.get(inbox.url + url + "/frame") as r:
            frame = await r.text()
            csp = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "img-src data:" in csp and "sandbox" in csp
            assert "script" not in csp.replace("allow-scripts", "")
            assert r.headers["X-Frame-Options"] == "SAMEORIGIN" and r.headers["Referrer-Policy"] == "no-referrer"
        assert 'src="data:image/png;base64,' in frame  # the cid: image, inlined
        async with alice.get(inbox.url + url + "/eml") as r:
            assert await r.read() == await inbox.spool.read_body(qid)
            assert r.headers["Content-Disposition"].startswith("attachment;")
        page_parts = re.findall(r'href="' + re.escape(url) + r'/part/(\d+)"', page)
        assert len(page_parts) >= 2
        for n in page_parts:
            async with alice.get(inbox.url + url + f"/part/{n}") as r:
                assert r.headers["Content-Type"] == "application/octet-stream"
                assert r.headers["Content-Disposition"].startswith("attachment;")
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                data = await r.read()
        assert data == "계약서 요약입니다.\n".encode()
        assert "filename*=UTF-8''%EC%9A%94%EC%95%BD.txt" in r.headers["Content-Disposition"]


async def test_signing_out_needs_the_csrf_token_and_same_origin(tmp_path: Path) -> None:
    async with running_inbox(tmp_path) as inbox:
        inbox.open()
        alice = await inbox.sign_in("alice@example.test")
        async with alice.post(inbox.url + "/signout", data={"csrf": "wrong"}) as r:
            assert r.status == 403
        async with alice.get(inbox.url + "/") as r:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await r.text())
        assert csrf
        async with alice.post(
            inbox.url + "/signout", data={"csrf": csrf.group(1)}, headers={"Origin": "https://evil.example"}
        ) as r:
            assert r.status == 403
        async with alice.post(inbox.url + "/signout", data={"csrf": csrf.group(1)}) as r:
            assert r.status == 200 and "signed out" in await r.text()
        async with alice.get(inbox.url + "/") as r:
            assert r.status == 401


async def test_a_cross_site_sign_in_post_is_refused(tmp_path: Path) -> None:
    async with running_inbox(tmp_path) as inbox:
        inbox.open()
        token = await inbox.link("alice@example.test")
        c = inbox.client()
        async with c.post(inbox.url + "/signin", data={"t": token}, headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 403
        async with c.post(inbox.url + "/signin", data={"t": token}, allow_redirects=False) as r:
            assert r.status == 303  # not spent by the refused attempt


@pytest.mark.parametrize(
    ("accept", "expect"),
    [
        ("ko-KR,ko;q=0.9,en-US;q=0.8,en;q=0.7", "보관 중인 메일"),
        ("en-US,en;q=0.9,ko;q=0.8", "Held mail"),
        ("fr-FR,fr;q=0.9", "Held mail"),
    ],
)
async def test_language_follows_accept_language(tmp_path: Path, accept: str, expect: str) -> None:
    async with running_inbox(tmp_path) as inbox:
        inbox.open()
        await put(inbox.spool, ["alice@example.test"], mail.korean())
        alice = await inbox.sign_in("alice@example.test", **{"Accept-Language": accept})
        async with alice.get(inbox.url + "/") as r:
            page = await r.text()
        assert expect in page
        assert "회의 일정 안내" in page and "김철수" in page  # ks_c_5601-1987 decoded


async def test_a_spool_failure_is_a_503_page_not_a_traceback(tmp_path: Path) -> None:
    async with running_inbox(tmp_path) as inbox:
        inbox.open()
        alice = await inbox.sign_in("alice@example.test")

        async def broken(*_a: object, **_k: object) -> list[object]:
            from backupmx.errors import SpoolError

            raise SpoolError("disk on fire")

        inbox.spool.list_messages = broken  # type: ignore[method-assign]
        async with alice.get(inbox.url + "/") as r:
            assert r.status == 503 and "cannot read its storage" in await r.text()


async def test_bounced_mail_is_not_held(tmp_path: Path) -> None:
    async with running_inbox(tmp_path) as inbox:
        inbox.open()
        s = inbox.spool
        await put(s, ["alice@example.test"], mail.plain(subject="Bounced one"), sender="")
        claims = await s.claim_due(now=inbox.clock.now() + 1, owner="t", lease_seconds=60, limit=10)
        await s.record(
            "t",
            [
                RecipientUpdate(c.message.id, r.index, Bounced(Reply(550, "5.1.1", "no")))
                for c in claims
                for r in c.recipients
            ],
            now=inbox.clock.now(),
        )
        alice = await inbox.sign_in("alice@example.test")
        async with alice.get(inbox.url + "/") as r:
            assert "Bounced one" not in await r.text()


async def test_over_tls_the_cookie_is_secure_and_hsts_is_sent(tmp_path: Path) -> None:
    import shutil
    import ssl
    import subprocess

    import aiohttp

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    async with running_inbox(tmp_path, tls_cert=str(crt), tls_key=str(key)) as inbox:
        inbox.open()
        assert inbox.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(crt))
        token = await inbox.link("alice@example.test")
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as c,
            c.post(inbox.url + "/signin", data={"t": token}, allow_redirects=False) as r,
        ):
            assert r.status == 303
            cookie = r.headers["Set-Cookie"]
            assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert r.headers["Strict-Transport-Security"].startswith("max-age=")
            assert r.headers["Server"] == "backupmx"


async def test_a_long_list_pages_newest_first(tmp_path: Path) -> None:
    async with running_inbox(tmp_path) as inbox:
        inbox.open()
        ids = [await put(inbox.spool, ["alice@example.test"], mail.plain(subject=f"number {i}")) for i in range(120)]
        alice = await inbox.sign_in("alice@example.test")
        seen: list[str] = []
        for page in (1, 2, 3):
            async with alice.get(inbox.url + f"/?page={page}") as r:
                html = await r.text()
            assert "120 messages" in html and f"Page {page}" in html
            seen += [u.split("/")[2] for u in urls(html)]
        assert seen == list(reversed(ids))
        async with alice.get(inbox.url + "/?page=99") as r:  # past the end: the last page
            assert [u.split("/")[2] for u in urls(await r.text())] == list(reversed(ids))[100:]
