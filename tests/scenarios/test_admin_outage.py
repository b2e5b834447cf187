"""An outage seen and handled from the admin side, over real HTTP, with the real SMTP server, health
monitor and delivery engine in one process: the primary stops, the API shows the declared outage and
the held mail, a webhook hears exactly one "down"; the operator reroutes to a second primary and the mail
arrives there; the primary comes back, the webhook hears exactly one "back"; /metrics follows along."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from backupmx.model import RecipientState
from tests.unit.admin.harness import TOKEN
from tests.unit.admin.node import running_node, until
from tests.unit.admin.test_alerts import receiver
from tests.unit.delivery.fake_primary import Primary


def metric(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise KeyError(name)


async def test_outage_reroute_and_recovery_through_the_api(tmp_path: Path) -> None:
    primary = await Primary().start()
    port = primary.port
    spare = await Primary(hostname="spare.test").start()
    async with (
        receiver() as hook,
        running_node(
            tmp_path,
            {"example.test": primary.hostport},
            alerts=[{"kind": "webhook", "url": hook.url, "interval": "1s", "on": ["primary_down"]}],
        ) as node,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
    ):

        async def get(path: str) -> dict:  # type: ignore[type-arg]
            async with http.get(node.url + path) as r:
                assert r.status == 200, await r.text()
                return await r.json()  # type: ignore[no-any-return]

        async def state() -> str:
            return str((await get("/api/domains/example.test"))["primary"]["state"])

        await until(lambda: _eq(state(), "up"), what="primary up")
        first = await asyncio.to_thread(node.send, ["alice@example.test"], "before the outage")
        await until(lambda: len(primary.received) == 1, what="delivery while up")

        # the primary stops: outage declared, mail held, one "down"
        await primary.stop()
        await until(lambda: _eq(state(), "down"), what="outage declared")
        held = [
            await asyncio.to_thread(node.send, ["alice@example.test", "bob@example.test"], f"held {i}")
            for i in range(3)
        ]
        doc = await get("/api/domains/example.test")
        assert doc["outage"]["declared"] is True and doc["drain_eta_seconds"] is None
        queue = await get("/api/queue?domain=example.test")
        assert [m["id"] for m in queue["messages"]] == held
        assert first not in [m["id"] for m in queue["messages"]]
        assert doc["recipients"]["queued"] == 6
        await until(lambda: len(hook.posts) == 1, what="the down alert")
        assert hook.posts[0]["status"] == "firing" and hook.posts[0]["domain"] == "example.test"
        async with aiohttp.ClientSession() as anon, anon.get(node.url + "/metrics") as r:
            text = await r.text()
        assert metric(text, "backupmx_outage_declared", domain="example.test") == 1
        assert metric(text, "backupmx_queue_recipients", domain="example.test", state="queued") == 6

        # hold one, then reroute everything else to the spare: the held one stays behind
        async with http.post(node.url + f"/api/queue/{held[0]}/hold") as r:
            assert (await r.json())["held"] == 2
        async with http.put(node.url + "/api/domains/example.test/reroute", json={"hosts": [spare.hostport]}) as r:
            assert r.status == 200, await r.text()
        await until(lambda: len(spare.deliveries()) == 4, what="rerouted mail at the spare")
        assert sorted(c.split(b"Subject: ")[1].split(b"\r\n")[0] for c in spare.contents()) == [b"held 1", b"held 2"]
        rec = await node.spool.get(held[0])
        assert rec is not None and {r.state for r in rec.recipients} == {RecipientState.HELD}
        # release it: it follows the reroute
        async with http.post(node.url + f"/api/queue/{held[0]}/release") as r:
            assert (await r.json())["released"] == 2
        await until(lambda: len(spare.deliveries()) == 6, what="the released message at the spare")
        assert (await get("/api/domains/example.test"))["recipients"]["queued"] == 0

        # undo the reroute, bring the primary back: exactly one "back"
        async with http.delete(node.url + "/api/domains/example.test/reroute") as r:
            assert (await r.json())["was_rerouted"] is True
        primary = await Primary().start(port)
        await until(lambda: len(hook.posts) == 2, timeout=30, what="the back alert")
        await asyncio.sleep(2.5)  # a few more evaluations: nothing more to say
        assert [(p["alert"], p["status"]) for p in hook.posts] == [
            ("primary_down", "firing"),
            ("primary_down", "resolved"),
        ]
        assert (await get("/api/domains/example.test"))["outage"]["declared"] is False
        outages = (await get("/api/domains/example.test"))["outages"]
        assert len(outages) == 1 and outages[0]["ended_at"] is not None
        await primary.stop()
    await spare.stop()


async def _eq(value: object, expected: str) -> bool:
    return await value == expected  # type: ignore[misc]
