"""The emergency inbox's gate against the real `backupmx serve`: while the primary answers and the
operator has not opened it, the inbox refuses everything (403 with a page saying why, in the reader's
language); `continuity open` opens it, `close` shuts it even during an outage, `auto` follows the
health monitor: it opens when the outage is declared and closes again when the primary is back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiosmtpd.controller import Controller

from tests.support.serve import ServeProcess, free_port


class Accept:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 Ok"


async def until_status(session: aiohttp.ClientSession, url: str, status: int, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        async with session.get(url) as r:
            last = r.status
            if r.status == status:
                return await r.text()
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url}: still {last}, not {status}, after {timeout}s")


async def test_closed_unless_outage_or_opened_by_hand(tmp_path: Path) -> None:
    primary_port = free_port()
    primary = Controller(Accept(), hostname="127.0.0.1", port=primary_port)
    primary.start()
    inbox_port = free_port()
    node = ServeProcess(
        tmp_path,
        domains=[{"name": "example.test", "primary": [f"127.0.0.1:{primary_port}"]}],
        delivery={"down_after": 2, "probe_timeout": "1s", "connect_timeout": "1s"},
        extra={"continuity": {"enabled": True, "listen": f"127.0.0.1:{inbox_port}"}},
    )
    url = f"http://127.0.0.1:{inbox_port}"
    try:
        await asyncio.to_thread(node.start)
        link = (await asyncio.to_thread(node.cli, "access", "grant", "alice@example.test")).stdout.splitlines()[-1]
        token = link.split("t=", 1)[1]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            await until_status(s, url + "/", 403)
            for path in (
                "/",
                f"/signin?t={token}",
                "/m/1K11FNWPJ26GFT/AAAAAAAAAAAAAAAAAAAAAA",
                "/anything",
                "/static/../../etc/passwd",
            ):
                async with s.get(url + path) as r:
                    page = await r.text()
                    assert r.status == 403, path
                    assert "The emergency inbox is closed" in page and "normal mailbox" in page
            async with s.post(url + "/signin", data={"t": token}) as r:
                assert r.status == 403
            async with s.get(url + "/", headers={"Accept-Language": "ko-KR,ko;q=0.9"}) as r:
                assert r.status == 403 and "비상 메일함이 닫혀 있습니다" in await r.text()

            # opened by hand: now it asks for a link, and the link (unspent so far) signs in
            out = (await asyncio.to_thread(node.cli, "continuity", "open", "example.test")).stdout
            assert "open (opened by hand)" in out
            await until_status(s, url + "/", 401)
            async with s.post(url + "/signin", data={"t": token}) as r:
                assert r.status == 200 and "Held mail" in await r.text()

            # closed by hand: even a signed-in reader is refused
            await asyncio.to_thread(node.cli, "continuity", "close", "example.test")
            await until_status(s, url + "/", 403)

            # automatic: closed while the primary answers, open once the outage is declared, closed after
            await asyncio.to_thread(node.cli, "continuity", "auto", "example.test")
            await asyncio.sleep(1.5)
            async with s.get(url + "/") as r:
                assert r.status == 403
            primary.stop()
            page = await until_status(s, url + "/", 200)
            assert "The mail service of example.test is down" in page
            primary = Controller(Accept(), hostname="127.0.0.1", port=primary_port)
            primary.start()
            await until_status(s, url + "/", 403)
    finally:
        node.kill()
        with contextlib.suppress(Exception):  # already stopped when a step above failed
            primary.stop()
