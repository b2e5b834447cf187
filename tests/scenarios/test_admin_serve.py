"""The admin listener of the real `backupmx serve` subprocess: the token it generates, 401 without it,
the outage and the held mail over the API, actions that the CLI then sees in the spool, a reroute that
delivers to a second primary, /metrics that agree with `backupmx queue count`, and a clean SIGTERM."""

from __future__ import annotations

import asyncio
import json
import smtplib
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.serve import ServeProcess
from tests.unit.admin.node import until
from tests.unit.delivery.fake_primary import Primary, closed_port


def send(port: int, rcpt: str, subject: str) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        c.mail("alice@sender.test")
        c.rcpt(rcpt)
        code, msg = c.data(f"From: alice@sender.test\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nhi\r\n".encode())
        assert code == 250, msg
        return msg.decode().rsplit(" ", 1)[-1]


async def test_admin_api_of_the_real_serve(tmp_path: Path) -> None:
    spare = await Primary(hostname="spare.test").start()
    node = ServeProcess(
        tmp_path / "node",
        admin=True,
        domains=[{"name": "example.test", "primary": [f"127.0.0.1:{closed_port()}"], "recipients": "any"}],
        delivery={"down_after": 2, "probe_interval": "1s", "retry_min": "1s", "retry_max": "2s"},
    )
    api = f"http://127.0.0.1:{node.admin_port}"
    try:
        await asyncio.to_thread(node.start)
        async with aiohttp.ClientSession() as anon:
            await until(lambda: _ok(anon, api + "/healthz"), what=f"/healthz\n{node.log()}")
            token_file = node.data_dir / "admin.token"
            token = token_file.read_text().strip()
            assert token_file.stat().st_mode & 0o777 == 0o600
            async with anon.get(api + "/api/status") as r:
                assert r.status == 401
            async with anon.get(api + "/login") as r:
                assert r.status == 200 and "Admin token" in await r.text()
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:

                async def get(path: str) -> Any:
                    async with http.get(api + path) as r:
                        assert r.status == 200, await r.text()
                        return await r.json()

                async def declared() -> bool:
                    return bool((await get("/api/domains/example.test"))["outage"]["declared"])

                await until(declared, what="the outage declared")
                ids = [await asyncio.to_thread(send, node.port, f"u{i}@example.test", f"m{i}") for i in range(3)]
                page = await get("/api/queue?domain=example.test")
                assert [m["id"] for m in page["messages"]] == ids

                # hold over the API; the CLI sees it in the spool
                async with http.post(api + f"/api/queue/{ids[0]}/hold") as r:
                    assert (await r.json())["held"] == 1
                listed = json.loads(node.cli("queue", "list", "--json").stdout)
                states = {m["id"]: m["recipients"][0]["state"] for m in listed["messages"]}
                assert states == {ids[0]: "held", ids[1]: "queued", ids[2]: "queued"}
                # delete over the API; the CLI count follows
                async with http.delete(api + f"/api/queue/{ids[2]}") as r:
                    assert (await r.json())["deleted"] is True
                assert node.queue_count() == 2

                async with anon.get(api + "/metrics") as r:
                    fams = {
                        s.name: s
                        for f in text_string_to_metric_families(await r.text())
                        for s in f.samples
                        if s.labels.get("domain") in ("example.test", None)
                    }
                assert fams["backupmx_outage_declared"].value == 1
                assert fams["backupmx_queue_messages"].value == node.queue_count() == 2

                # reroute to the spare: the queued message goes there; the held one stays
                async with http.put(api + "/api/domains/example.test/reroute", json={"hosts": [spare.hostport]}) as r:
                    assert r.status == 200, await r.text()
                await until(lambda: len(spare.received) == 1, what="the rerouted message at the spare")
                assert b"Subject: m1" in spare.received[0].content
                async with http.post(api + f"/api/queue/{ids[0]}/release") as r:
                    assert (await r.json())["released"] == 1
                await until(lambda: len(spare.received) == 2, what="the released message at the spare")
                assert node.queue_count() == 0
                async with http.delete(api + "/api/domains/example.test/reroute") as r:
                    assert (await r.json())["was_rerouted"] is True
        assert await asyncio.to_thread(node.terminate) == 0
        maillog = node.log()
        assert f"backupmx/held: {ids[0]}: via=api" in maillog
        assert f"backupmx/delivered: {ids[1]}: to=<u1@example.test>, relay={spare.hostport}" in maillog
    finally:
        node.kill()
        await spare.stop()


async def _ok(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
