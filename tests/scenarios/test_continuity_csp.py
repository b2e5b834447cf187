"""Defence in depth, proven layer by layer in a real headless Chromium: the hostile message is served
to the inbox's frame *without sanitising* (the sanitiser replaced by the identity), so only the frame's
Content-Security-Policy and the iframe's sandbox stand between it and the reader. Still no script runs
(no dialog), no request leaves for another origin, and the loopback server the message points at is
never hit. The same page with the real sanitiser is covered against `backupmx serve` in
test_continuity_browser.py; this test shows the second wall holds on its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from backupmx.continuity.render import SafeHtml
from tests.scenarios.test_continuity_browser import Recorder, context
from tests.support.chromium import launched_chromium, needs_chromium
from tests.unit.continuity import mail
from tests.unit.continuity.harness import put, running_inbox

pytestmark = needs_chromium


def unsanitised(html: str, inline: dict[str, str]) -> SafeHtml:
    return SafeHtml(html, False)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with launched_chromium() as b:
        yield b


async def test_csp_and_sandbox_alone_stop_the_hostile_message(tmp_path: Path, browser: Any) -> None:
    with Recorder() as recorder:
        async with running_inbox(tmp_path, sanitize=unsanitised) as inbox:
            inbox.open()
            qid = await put(inbox.spool, ["alice@example.test"], mail.hostile(recorder.origin))
            token = await inbox.link("alice@example.test")
            ctx, watch = await context(browser)
            page = await ctx.new_page()
            await page.goto(f"{inbox.url}/signin?t={token}")
            await page.click("#signin")
            await page.wait_for_selector("ol.messages")
            await page.click(f"#m-{qid} a")
            frame = page.frame_locator("iframe.body")
            assert await frame.locator("#hostile-title").inner_text() == "Totally normal invoice"
            # the raw markup is really there this time: the form, the script-bearing links
            assert await frame.locator("#phish").count() == 1
            await frame.locator("#js-link").click()
            await frame.locator("#phish-submit").click()
            await frame.locator("#data-link").click()
            await page.wait_for_timeout(2000)  # meta refresh, autoplay, timers
            assert watch.dialogs == [], watch.dialogs
            # the raw markup did try to reach the other server, and the browser refused every attempt
            # before sending it (Playwright reports those as failed with "csp")
            assert len(watch.foreign(inbox.url)) >= 10, watch.requests
            assert watch.left(inbox.url) == [], watch.left(inbox.url)
            assert recorder.hits == [], recorder.hits
            # what stopped each attack, in the browser's own words
            said = "\n".join(watch.console)
            for refusal in (
                "Blocked script execution",  # <script>, on* handlers: sandbox without allow-scripts
                "Running the JavaScript URL violates",  # javascript: link: CSP default-src 'none'
                "Blocked form submission",  # the phishing form: sandbox without allow-forms
                "Refused to execute the redirect",  # meta refresh: sandboxed document
                "base-uri 'none'",  # <base href>
                "img-src data:",  # remote, srcset, svg, CSS url() and background images
                "style-src 'unsafe-inline'",  # <link rel=stylesheet>, @import
                "object-src",  # <object>, <embed>
                "media-src",  # <video>, <audio>
                "Blocked autofocusing",  # autofocus + onfocus
            ):
                assert refusal in said, refusal
            await ctx.close()
            await asyncio.sleep(0)
