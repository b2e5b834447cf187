"""The emergency inbox of a real `backupmx serve` under abuse (issue 13, items 4 and 5).

- A 3.9 MB message of 20,000 small parts: six readers opening it at once each get the "too large to
  show, download the .eml" page (it is never parsed), the .eml still downloads whole, and the admin
  /healthz answers 200 all the while, also while six readers open a 450-part message (under the
  budget: parsed once, on the inbox's own threads); an ordinary message beside them still shows.
- 300 forged sign-in links from one client address: after the first few, 429 with Retry-After; the
  audit log grows by a line or two (not 300), and on stop one line carries the count. Another address
  still signs in. The admin login is limited the same way.
The clients bind distinct loopback source addresses (127.0.0.x), which is how the limiter tells them apart.
"""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.support.serve import ServeProcess, free_port

PARTS = 20_000
TIMEOUT = aiohttp.ClientTimeout(total=60)  # a hang guard only; nothing passes or fails on time


def big_message(parts_count: int = PARTS, subject: bytes = b"Twenty thousand parts") -> bytes:
    parts = [
        b'--BIGBOUNDARY\r\nContent-Type: text/plain; name="p%05d.txt"\r\n'
        b'Content-Disposition: attachment; filename="p%05d.txt"\r\n\r\n'
        b"part %05d of a message made to stall a parser.\r\n" % (i, i, i)
        for i in range(parts_count)
    ]
    return (
        b"From: mallory@else.test\r\nTo: alice@example.test\r\nSubject: " + subject + b"\r\n"
        b"Date: Sun, 06 Dec 2026 03:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="BIGBOUNDARY"\r\n\r\n' + b"".join(parts) + b"--BIGBOUNDARY--\r\n"
    )


def small_message() -> bytes:
    return (
        b"From: bob@else.test\r\nTo: alice@example.test\r\nSubject: Lunch\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n'
        b'See you at noon.\r\n--b1\r\nContent-Type: text/plain; name="menu.txt"\r\n'
        b'Content-Disposition: attachment; filename="menu.txt"\r\n\r\nsoup\r\n--b1--\r\n'
    )


def send(port: int, body: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
        c.ehlo("client.test")
        c.mail("sender@else.test")
        assert c.rcpt("alice@example.test")[0] == 250
        code, msg = c.data(body)
        assert code == 250, msg
        return msg.decode().rsplit(" ", 1)[-1]


@dataclass
class Node:
    serve: ServeProcess
    inbox: str
    admin: str

    def link(self, address: str) -> str:
        out = self.serve.cli("access", "grant", address).stdout
        return next(line for line in out.splitlines() if "/signin?t=" in line).strip().split("/signin?t=")[1]

    @property
    def audit(self) -> Path:
        return self.serve.data_dir / "continuity-audit.log"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    inbox_port = free_port()
    with ServeProcess(
        tmp_path,
        admin=True,
        extra={
            "continuity": {"enabled": True, "listen": f"127.0.0.1:{inbox_port}"},
            "dns": {"nameservers": [f"127.0.0.1:{free_port()}"]},
        },
    ) as serve:
        serve.start()
        serve.cli("continuity", "open", "example.test")
        yield Node(serve, f"http://127.0.0.1:{inbox_port}", f"http://127.0.0.1:{serve.admin_port}")


def client(source: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(source, 0)),
        timeout=TIMEOUT,
        cookie_jar=aiohttp.CookieJar(unsafe=True),
    )


async def sign_in(node: Node, c: aiohttp.ClientSession) -> None:
    token = node.link("alice@example.test")
    for _ in range(100):  # the gate caches "closed" for a second after `continuity open`
        async with c.post(node.inbox + "/signin", data={"t": token}, allow_redirects=False) as r:
            if r.status == 303:
                return
            assert r.status == 403, await r.text()
        await asyncio.sleep(0.1)
    raise AssertionError("the inbox did not open")


async def test_a_message_of_20000_parts_gets_the_too_large_page_and_healthz_stays_up(node: Node) -> None:
    big = await asyncio.to_thread(send, node.serve.port, big_message())
    small = await asyncio.to_thread(send, node.serve.port, small_message())
    mid = await asyncio.to_thread(send, node.serve.port, big_message(450, b"Four hundred and fifty parts"))
    async with client("127.0.0.1") as c, aiohttp.ClientSession(timeout=TIMEOUT) as admin:
        await sign_in(node, c)
        async with c.get(node.inbox + "/") as r:
            page = await r.text()
        big_url = re.search(rf'href="(/m/{big}/[A-Za-z0-9_-]{{22}})"', page)
        small_url = re.search(rf'href="(/m/{small}/[A-Za-z0-9_-]{{22}})"', page)
        mid_url = re.search(rf'href="(/m/{mid}/[A-Za-z0-9_-]{{22}})"', page)
        assert big_url and small_url and mid_url, page

        async def view(path: str) -> tuple[int, str]:
            async with c.get(node.inbox + path) as r:
                return r.status, await r.text()

        stop = asyncio.Event()
        health: list[int] = []

        async def watch_health() -> None:
            while not stop.is_set() and len(health) < 500:
                async with admin.get(node.admin + "/healthz") as r:
                    health.append(r.status)
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch_health())
        try:
            views = await asyncio.gather(
                *(view(big_url.group(1)) for _ in range(6)), view(big_url.group(1) + "/part/3")
            )
            # under the budget, 450 parts are parsed (once, shared by six readers) while /healthz answers
            mids = await asyncio.gather(*(view(mid_url.group(1)) for _ in range(6)))
        finally:
            stop.set()
            await watcher
        for status, text in mids:
            assert status == 200 and "p00449.txt" in text and "Too large" not in text
        for status, text in views:
            assert status == 200
            assert "Too large to show here" in text and f"{big_url.group(1)}/eml" in text
            assert "p00003.txt" not in text  # no part was listed: nothing was parsed
        assert health and set(health) == {200}, health
        async with c.get(node.inbox + big_url.group(1) + "/frame") as r:
            assert r.status == 404
        async with c.get(node.inbox + big_url.group(1) + "/eml") as r:
            assert r.status == 200 and (await r.read()).count(b"--BIGBOUNDARY\r\n") == PARTS
        status, text = await view(small_url.group(1))  # an ordinary message still shows, with its part
        assert status == 200 and "See you at noon." in text and "menu.txt" in text


async def test_forged_links_are_rate_limited_and_audited_in_one_line(node: Node) -> None:
    before = node.audit.stat().st_size if node.audit.exists() else 0
    statuses: list[int] = []
    async with client("127.0.0.3") as bad:
        for _ in range(100):  # wait until the inbox is open (the gate caches for a second)
            async with bad.get(node.inbox + "/signin?t=x") as r:
                if r.status != 403 or "closed" not in await r.text():
                    break
            await asyncio.sleep(0.1)
        for i in range(300):
            forged = f"v1.{'A' * 40}{i}.{'B' * 43}"
            if i % 2:
                req = bad.post(node.inbox + "/signin", data={"t": forged}, allow_redirects=False)
            else:
                req = bad.get(node.inbox + f"/signin?t={forged}")
            async with req as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert r.headers["Retry-After"].isdigit() and int(r.headers["Retry-After"]) >= 1
                    assert "Too many attempts" in await r.text()
        assert statuses.count(429) >= 285 and set(statuses) <= {403, 429}, statuses[:20]
        grown = node.audit.stat().st_size - before
        assert grown < 1024, grown  # the first refusal is written; the rest are counted (was 300 lines)

        # another address is not affected
        async with client("127.0.0.4") as good:
            await sign_in(node, good)
            async with good.get(node.inbox + "/") as r:
                assert r.status == 200

        # the admin login: the same limit for wrong tokens, and the right one from elsewhere still works
        admin_statuses = []
        for _ in range(30):
            async with bad.post(
                node.admin + "/login", data={"token": "wrong-token-wrong-token"}, allow_redirects=False
            ) as r:
                admin_statuses.append(r.status)
                if r.status == 429:
                    assert r.headers["Retry-After"].isdigit()
        assert admin_statuses[:10] == [401] * 10 and set(admin_statuses[10:]) == {429}
        token = (node.serve.data_dir / "admin.token").read_text().strip()
        async with (
            client("127.0.0.4") as good,
            good.post(node.admin + "/login", data={"token": token}, allow_redirects=False) as r,
        ):
            assert r.status == 303

    assert node.serve.terminate() == 0  # stopping writes the count of the burst still open
    refused = [
        json.loads(line)
        for line in node.audit.read_text().splitlines()
        if '"signin-refused"' in line and '"127.0.0.3"' in line
    ]
    assert 1 <= len(refused) <= 3, refused
    assert sum(e.get("count", 1) for e in refused) == 301  # the 300 and the probe "t=x" that found it open
    counted = next(e for e in refused if "count" in e)
    assert counted["why"]["rate-limited"] >= 285
