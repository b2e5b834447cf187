"""In headless Chromium (issue 13, item 7): a login link whose `next` hides a second slash behind a tab
(`/%09/127.0.0.1:PORT/x`, which Chromium reads as `//127.0.0.1:PORT/x` once it drops the tab) lands on
the dashboard, never on the other site: a loopback server stands in for the attacker's and records any
visit."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from backupmx.weblisten import start_site
from tests.support.chromium import launched_chromium, needs_chromium
from tests.unit.admin.harness import TOKEN, running_admin

pytestmark = needs_chromium


async def test_login_next_with_a_hidden_second_slash_stays_on_the_dashboard(tmp_path: Path) -> None:
    visits: list[str] = []

    async def evil(request: web.Request) -> web.Response:
        visits.append(request.path)
        return web.Response(text="evil")

    app = web.Application()
    app.router.add_get("/{tail:.*}", evil)
    runner, (host, port) = await start_site(app, "127.0.0.1", 0)
    try:
        async with running_admin(tmp_path) as h, launched_chromium() as browser:
            page = await browser.new_page()
            await page.goto(h.url + f"/login?next=/%09/{host}:{port}/x")
            await page.fill("#token", TOKEN)
            async with page.expect_navigation():
                await page.click("button[type=submit]")
            assert page.url == h.url + "/", page.url
            assert await page.locator("header.top nav").count() == 1  # the dashboard, signed in
            assert visits == []
    finally:
        await runner.cleanup()
