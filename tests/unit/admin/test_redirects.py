"""Redirects and notices over real HTTP (issue 13, item 7): `/login?next=` and the dashboard's `back=`
keep only same-site paths after normalising (a tab, a backslash, a scheme or a second slash sends you
home); `?done=` shows a fixed text for a known code filled with checked values, never text from the
URL; and the Origin check compares scheme, host and port. The emergency inbox's sign-in checks Origin
the same way."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from tests.unit.admin.harness import TOKEN, Harness, put, running_admin
from tests.unit.continuity.harness import running_inbox

EVIL = [
    "/\t/evil.test/x",
    "//evil.test/x",
    "/\\evil.test",
    "/\\/evil.test",
    "https://evil.test/",
    "javascript:alert(1)",
    "http:/evil.test",
    "/x\r\nSet-Cookie: a=b",
    "/\x00/evil.test",
    " //evil.test",
    "/\n/evil.test",
    "/../evil.test",
    "evil.test",
]


async def logged_in(h: Harness) -> aiohttp.ClientSession:
    s = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with s.post(h.url + "/login", data={"token": TOKEN}, allow_redirects=False) as r:
        assert r.status == 303
    return s


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert m is not None
    return m.group(1)


async def test_login_next_keeps_only_same_site_paths(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h, aiohttp.ClientSession() as s:
        async with s.get(h.url + "/login?next=/%09/evil.test/x") as r:  # the reported case
            assert 'name="next" value="/"' in await r.text()
        for evil in EVIL:
            async with s.post(h.url + "/login", data={"token": TOKEN, "next": evil}, allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/", repr(evil)
        # a real target survives the round trip through the login page, "&" and all
        async with s.get(h.url + "/queue?state=held&domain=example.test", allow_redirects=False) as r:
            login = r.headers["Location"]
        async with s.get(h.url + login) as r:
            nxt = re.search(r'name="next" value="([^"]*)"', await r.text())
        assert nxt is not None and nxt.group(1) == "/queue?state=held&amp;domain=example.test"
        async with s.post(
            h.url + "/login",
            data={"token": TOKEN, "next": "/queue?state=held&domain=example.test"},
            allow_redirects=False,
        ) as r:
            assert r.headers["Location"] == "/queue?state=held&domain=example.test"


async def test_dashboard_back_is_same_site_and_notices_come_from_codes(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        qid = await put(h.spool, ["a@example.test"])
        s = await logged_in(h)
        try:
            async with s.get(h.url + f"/queue/{qid}") as r:
                csrf = csrf_of(await r.text())
            for i, evil in enumerate(["/\t/evil.test", "//evil.test", "/\\evil.test", "https://evil.test"]):
                action = "hold" if i % 2 == 0 else "release"
                async with s.post(
                    h.url + f"/ui/queue/{qid}/{action}", data={"csrf": csrf, "back": evil}, allow_redirects=False
                ) as r:
                    assert r.status == 303 and r.headers["Location"].startswith(f"/queue/{qid}?done="), evil
            async with s.post(
                h.url + "/ui/domains/example.test/flush",
                data={"csrf": csrf, "back": "/\t/evil.test"},
                allow_redirects=False,
            ) as r:
                assert r.headers["Location"].startswith("/domains/example.test?done=flushed")
            async with s.get(h.url + r.headers["Location"]) as r:
                assert "Flushed example.test:" in await r.text()
            # text in the URL is never shown: unknown codes, free text, and values that fail their check
            for query in (
                "done=You+were+hacked",
                "problem=Call+0800+now",
                "done=held&n=1&msg=%3Cb%3Eevil",
                "done=flushed&n=1&dom=evil.test",
                "done=held&n=lots&msg=" + qid,
            ):
                async with s.get(h.url + f"/queue/{qid}?{query}") as r:
                    page = await r.text()
                    assert r.status == 200
                    assert '<div class="flash' not in page, query
                    assert "were hacked" not in page and "Call 0800" not in page and "<b>evil" not in page
            async with s.get(h.url + f"/queue/{qid}?done=held&n=2&msg={qid}") as r:
                assert f"Held {qid} (2 recipient(s))." in await r.text()
            # a failed action answers with its error on the POST itself, not through the URL
            async with s.post(
                h.url + "/ui/domains/example.test/reroute",
                data={"csrf": csrf, "hosts": "mx.test:notaport", "back": "/domains/example.test"},
                allow_redirects=False,
            ) as r:
                assert r.status == 400 and "is not host:port" in await r.text()
        finally:
            await s.close()


@pytest.mark.parametrize(
    "origin_of",
    [
        lambda u: u.replace("http://", "https://"),  # scheme differs (the old check compared host:port only)
        lambda u: u.rsplit(":", 1)[0] + ":1",  # port differs
        lambda u: "http://evil.test",
        lambda u: "null",
        lambda u: "http://127.0.0.1:99999",
    ],
)
async def test_origin_must_match_scheme_host_and_port(tmp_path: Path, origin_of: object) -> None:
    async with running_admin(tmp_path) as h:
        qid = await put(h.spool, ["a@example.test"])
        s = await logged_in(h)
        try:
            async with s.get(h.url + f"/queue/{qid}") as r:
                csrf = csrf_of(await r.text())
            form = {"csrf": csrf, "back": "/queue"}
            assert callable(origin_of)
            async with s.post(
                h.url + f"/ui/queue/{qid}/hold", data=form, headers={"Origin": origin_of(h.url)}, allow_redirects=False
            ) as r:
                assert r.status == 403
            async with s.post(
                h.url + f"/ui/queue/{qid}/hold", data=form, headers={"Origin": h.url}, allow_redirects=False
            ) as r:
                assert r.status == 303
        finally:
            await s.close()


async def test_inbox_sign_in_checks_the_origin_scheme(tmp_path: Path) -> None:
    async with running_inbox(tmp_path) as inbox:
        inbox.open()
        token = await inbox.link("alice@example.test")
        c = inbox.client()
        https_twin = inbox.url.replace("http://", "https://")
        async with c.post(
            inbox.url + "/signin", data={"t": token}, headers={"Origin": https_twin}, allow_redirects=False
        ) as r:
            assert r.status == 403
        async with c.post(
            inbox.url + "/signin", data={"t": token}, headers={"Origin": inbox.url}, allow_redirects=False
        ) as r:
            assert r.status == 303
