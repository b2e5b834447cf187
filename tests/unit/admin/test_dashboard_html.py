"""Dashboard pages over HTTP without a browser: login and its redirects, escaping of message content,
CSRF tokens in every form, security headers, and an error page for unknown things."""

from __future__ import annotations

import re
import time
from pathlib import Path

import aiohttp

from backupmx.monitor import DestinationState
from tests.unit.admin.harness import TOKEN, Harness, put, running_admin


async def logged_in(h: Harness) -> aiohttp.ClientSession:
    s = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with s.post(h.url + "/login", data={"token": TOKEN, "next": "/queue"}, allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/queue"
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    return s


async def test_pages_render_escape_and_carry_csrf_tokens(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        h.health.set("example.test", DestinationState.DOWN, outage_since=time.time() - 60)
        body = b"From: x@sender.test\r\nSubject: <script>alert(1)</script>\r\n\r\nhi\r\n"
        qid = await put(h.spool, ["a@example.test"], body=body)
        s = await logged_in(h)
        try:
            for path in (
                "/",
                "/queue",
                "/queue?domain=example.test&state=queued",
                "/domains/example.test",
                f"/queue/{qid}",
                "/review",
            ):
                async with s.get(h.url + path) as r:
                    assert r.status == 200, path
                    html = await r.text()
                    assert "Content-Security-Policy" in r.headers
                assert "<script>alert(1)" not in html
                forms = re.findall(r"<form method=\"post\".*?</form>", html, re.S)
                assert all(
                    'name="csrf" value="' in f and 'value=""' not in f.split('name="csrf"')[1][:12]
                    for f in forms
                    if "/login" not in f
                ), path
                assert "Outage declared: example.test" in html, path
            async with s.get(h.url + f"/queue/{qid}") as r:
                assert "&lt;script&gt;alert(1)&lt;/script&gt;" in await r.text()
            async with s.get(h.url + "/queue/0000000000000Z") as r:
                assert r.status == 404 and "Error 404" in await r.text()
            async with s.get(h.url + "/domains/nope.test") as r:
                assert r.status == 404
        finally:
            await s.close()


async def test_login_refuses_wrong_tokens_and_open_redirects(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h, aiohttp.ClientSession() as s:
        async with s.get(h.url + "/queue?domain=x", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/login?next=/queue?domain%3Dx"
        async with s.post(h.url + "/login", data={"token": "wrong-wrong-wrong-wrong"}) as r:
            assert r.status == 401 and "That token is not right" in await r.text()
        for evil in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
            async with s.post(h.url + "/login", data={"token": TOKEN, "next": evil}, allow_redirects=False) as r:
                assert r.headers["Location"] == "/", evil


async def test_a_form_post_from_another_origin_is_refused(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        qid = await put(h.spool, ["a@example.test"])
        s = await logged_in(h)
        try:
            async with s.get(h.url + f"/queue/{qid}") as r:
                csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', await r.text())
            assert csrf is not None
            form = {"csrf": csrf.group(1), "back": "/queue"}
            async with s.post(
                h.url + f"/ui/queue/{qid}/hold",
                data=form,
                headers={"Origin": "http://evil.example"},
                allow_redirects=False,
            ) as r:
                assert r.status == 403
            async with s.post(h.url + f"/ui/queue/{qid}/hold", data=form, allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"].startswith("/queue?done=held")
            rec = await h.spool.get(qid)
            assert rec is not None and rec.recipients[0].state.value == "held"
            # the API with a session cookie also wants the CSRF header for changes
            async with s.post(h.url + f"/api/queue/{qid}/release") as r:
                assert r.status == 403
            async with s.post(h.url + f"/api/queue/{qid}/release", headers={"X-CSRF-Token": csrf.group(1)}) as r:
                assert r.status == 200 and (await r.json())["released"] == 1
            old = next(c.value for c in s.cookie_jar if c.key == "backupmx_session")
            async with s.post(h.url + "/logout", data={"csrf": csrf.group(1)}, allow_redirects=False) as r:
                assert r.status == 303
            async with (
                aiohttp.ClientSession() as replay,
                replay.get(h.url + "/api/status", headers={"Cookie": f"backupmx_session={old}"}) as r,
            ):
                assert r.status == 401  # the logged-out cookie is refused even if someone kept it
        finally:
            await s.close()
