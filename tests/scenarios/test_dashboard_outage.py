"""The dashboard in a real headless Chromium against a whole node (real SMTP server, health monitor,
delivery engine, SQLite spool): log in, see the declared outage and the held mail after the primary
stopped, hold and release a message, reroute the domain to a second primary and see the mail arrive
there, review a recovery-guard hold. Also: the session cookie's flags, CSRF refusal, a phone-width page
without sideways scrolling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from backupmx.model import RecipientState
from tests.support.chromium import launched_chromium, needs_chromium
from tests.unit.admin.harness import TOKEN
from tests.unit.admin.node import Node, running_node, until
from tests.unit.delivery.fake_primary import Primary

pytestmark = needs_chromium


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with launched_chromium() as b:
        yield b


async def login(page: Any, node: Node, token: str = TOKEN) -> None:
    await page.goto(node.url + "/")
    assert "/login" in page.url
    await page.fill("#token", token)
    await page.click("button[type=submit]")


async def rcpt_states(node: Node, qid: str) -> set[RecipientState]:
    rec = await node.spool.get(qid)  # type: ignore[arg-type]
    assert rec is not None
    return {r.state for r in rec.recipients}


async def test_operator_handles_an_outage_in_the_dashboard(tmp_path: Path, browser: Any) -> None:
    primary = await Primary().start()
    spare = await Primary(hostname="spare.test").start()
    async with running_node(tmp_path, {"example.test": primary.hostport, "other.test": spare.hostport}) as node:
        ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await ctx.new_page()
        page.set_default_timeout(15_000)
        page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))

        # a wrong token is refused; the right one gives a HttpOnly, SameSite=Strict session cookie
        await login(page, node, token="not-the-token-at-all")
        assert "That token is not right" in await page.inner_text("main")
        await page.fill("#token", TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_selector("section.card.domain")
        cookie = next(c for c in await ctx.cookies() if c["name"] == "backupmx_session")
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
        assert TOKEN not in cookie["value"]

        # the primary stops: after the probes, a red banner and the held mail
        await primary.stop()
        await until(lambda: node.monitor.snapshot()["example.test"].outage_declared, what="outage declared")
        held = [await asyncio.to_thread(node.send, ["alice@example.test"], f"held message {i}") for i in range(3)]
        await page.goto(node.url + "/")
        banner = await page.inner_text(".banner.outage")
        assert "Outage declared: example.test" in banner and "3 recipients held safely" in banner
        assert "down" in (await page.inner_text("#d-example\\.test .badge")).lower()
        await page.click('#d-example\\.test a.button >> text="Queue"')
        await page.wait_for_selector("table.queue")
        for qid in held:
            assert await page.locator(f"#m-{qid}").count() == 1

        # hold one message, then release it, from its row
        await page.click(f"#m-{held[0]} >> button:has-text('Hold')")
        await page.wait_for_selector(".flash.ok")
        assert f"Held {held[0]}" in await page.inner_text(".flash.ok")
        assert await rcpt_states(node, held[0]) == {RecipientState.HELD}
        assert "held" in (await page.inner_text(f"#m-{held[0]} .badge")).lower()
        await page.click(f"#m-{held[0]} >> button:has-text('Release')")
        await page.wait_for_selector(".flash.ok")
        assert await rcpt_states(node, held[0]) == {RecipientState.QUEUED}

        # reroute the domain to the second primary: the mail arrives there
        await page.goto(node.url + "/domains/example.test")
        await page.fill("#hosts", spare.hostport)
        await page.click("#reroute button[type=submit]")
        await page.wait_for_selector(".flash.ok")
        assert f"now goes to {spare.hostport}" in await page.inner_text(".flash.ok")
        await until(lambda: len(spare.received) == 3, what="the held mail at the second primary")
        subjects = sorted(c.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for c in spare.contents())
        assert subjects == [f"held message {i}" for i in range(3)]
        await page.goto(node.url + "/domains/example.test")
        assert f"rerouted to {spare.hostport}" in await page.inner_text("dl.facts")
        await page.click("text=Stop rerouting")
        await page.wait_for_selector(".flash.ok")
        assert "goes to its primary again" in await page.inner_text(".flash.ok")

        # CSRF: a form post without the token is refused even with the session cookie
        resp = await page.request.post(node.url + "/ui/domains/example.test/flush", form={"back": "/"})
        assert resp.status == 403
        resp = await page.request.post(
            node.url + "/ui/domains/example.test/flush", form={"csrf": "0" * 40, "back": "/"}
        )
        assert resp.status == 403

        # a message deleted from its page (after the confirm dialog)
        other = await asyncio.to_thread(node.send, ["carol@example.test"], "to be deleted")
        await page.goto(node.url + f"/queue/{other}")
        assert "to be deleted" in await page.inner_text(".subject")
        await page.click("button:has-text('Delete')")
        await page.wait_for_selector(".flash.ok")
        assert await node.spool.get(other) is None  # type: ignore[arg-type]

        # a phone screen: everything fits, nothing scrolls sideways
        phone = await browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
        ppage = await phone.new_page()
        await login(ppage, node)
        for path in ("/", "/queue", "/domains/example.test", f"/queue/{held[0]}", "/review"):
            await ppage.goto(node.url + path)
            overflow = await ppage.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, (path, overflow)
        await phone.close()

        # logging out ends the session
        await page.goto(node.url + "/")
        await page.click("text=Log out")
        await page.goto(node.url + "/queue")
        assert "/login" in page.url
        await ctx.close()
    await spare.stop()


async def test_recovery_guard_holds_are_reviewed_and_released(tmp_path: Path, browser: Any) -> None:
    primary = await Primary().start()
    port = primary.port
    async with running_node(tmp_path, {"example.test": primary.hostport}) as node:
        await primary.stop()
        await until(lambda: node.monitor.snapshot()["example.test"].outage_declared, what="outage declared")
        qid = await asyncio.to_thread(node.send, ["newhire@example.test", "alice@example.test"], "welcome")
        # the primary comes back not knowing the new user yet: 550, which the recovery guard holds
        primary = await Primary().start(port)
        primary.rcpt_rule = lambda a: "550 5.1.1 no such user" if a.startswith("newhire@") else None
        await until(lambda: len(primary.received) == 1, what="alice delivered after the outage")
        await until(lambda: _held_by_guard(node, qid), what="newhire held by the recovery guard")

        page = await (await browser.new_context()).new_page()
        page.set_default_timeout(15_000)
        await login(page, node)
        await page.wait_for_selector("header.top nav")
        assert "1" in await page.inner_text("header.top nav .count")
        await page.goto(node.url + "/review")
        row = await page.inner_text("table.list tbody")
        assert qid in row and "newhire@example.test" in row and "550 5.1.1 no such user" in row
        primary.rcpt_rule = None  # the primary now knows the user
        await page.click("button:has-text('Release all 1 of example.test')")
        await page.wait_for_selector(".flash.ok")
        await until(lambda: len(primary.received) == 2, what="newhire delivered after review")
        assert await rcpt_states(node, qid) == {RecipientState.DELIVERED}
        await page.goto(node.url + "/review")
        assert "Nothing awaits review" in await page.inner_text("main")
        await primary.stop()


async def _held_by_guard(node: Node, qid: str) -> bool:
    rec = await node.spool.get(qid)  # type: ignore[arg-type]
    return rec is not None and any(r.held_reason == "recovery-guard" for r in rec.recipients)
