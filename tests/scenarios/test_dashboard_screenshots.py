"""The dashboard's main views photographed in headless Chromium, desktop and phone, in the middle of a
realistic outage: example.com's primary has been down for a bit over three hours (mail piling up, two
messages held by the operator), example.org's primary had a short outage this morning and left two
recipients held by the recovery guard. The node is real (SMTP, monitor, engine, spool); the queue and
the 24 hours of chart history are seeded into its spool and metrics store, as they would have been
recorded. Set BACKUPMX_SCREENSHOTS=docs to refresh docs/*.png; otherwise the pictures go to a temp dir
and the test only checks that each page rendered what it should."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from backupmx.admin.timeseries import SeriesPoint
from backupmx.model import Deferred, Envelope, QueueId, Recipient
from backupmx.reply import Reply
from backupmx.spool import BodyBuffer, RecipientUpdate
from backupmx.spool.sqlite import SqliteSpool
from tests.scenarios.test_dashboard_outage import login
from tests.support.chromium import CHROMIUM, CHROMIUM_ARGS
from tests.unit.admin.node import running_node, until
from tests.unit.delivery.fake_primary import Primary, closed_port

playwright_api = pytest.importorskip("playwright.async_api")
pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")
REPO = Path(__file__).resolve().parents[2]

PEOPLE = [
    "anna",
    "ben",
    "chloe",
    "david",
    "emma",
    "farid",
    "grace",
    "hugo",
    "ines",
    "jonas",
    "billing",
    "sales",
    "support",
    "hr",
]
SENDERS = [
    "orders@shop.example",
    "cfo@partner.example",
    "noreply@bank.example",
    "team@project.example",
    "news@lists.example",
    "carla@customer.example",
    "it@supplier.example",
]
SUBJECTS = [
    "Invoice 2026-1184",
    "Re: contract draft",
    "Your statement is ready",
    "Weekly status",
    "Meeting tomorrow 10:00",
    "Order #88231 shipped",
    "Re: Re: budget",
    "Password reset",
]


async def seed(data_dir: Path, now: float, rng: random.Random) -> dict[str, Any]:
    """The spool as a node would have left it; returns what the charts need to agree with."""
    spool = SqliteSpool(data_dir, node="mx2.example.net")
    await spool.open()
    out_start = now - (3 * 3600 + 17 * 60)
    org_out = (now - 6 * 3600 - 40 * 60, now - 6 * 3600 - 2 * 60)
    await spool.outage_started("example.org", org_out[0])
    await spool.outage_ended("example.org", org_out[1])
    await spool.outage_started("example.com", out_start)
    arrivals: list[tuple[float, int]] = []
    ids: list[QueueId] = []
    t = out_start + 120
    while t < now - 240:
        rcpts = [f"{rng.choice(PEOPLE)}@example.com"]
        if rng.random() < 0.2:
            rcpts.append(f"{rng.choice(PEOPLE)}@example.com")
        rcpts = list(dict.fromkeys(rcpts))
        sender = rng.choice(SENDERS)
        body = (
            f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: {rng.choice(SUBJECTS)}\r\n\r\n"
            + "text\r\n" * rng.randint(20, 4000)
        ).encode()
        env = Envelope(
            sender=sender,
            recipients=tuple(Recipient(r) for r in rcpts),
            client_ip="198.51.100.7",
            client_helo="mail.sender.example",
        )
        ids.append(await spool.put(env, BodyBuffer.from_bytes(body), now=t))
        arrivals.append((t, len(rcpts)))
        t += rng.expovariate(1 / 300)
    for qid in ids[5:7]:
        await spool.hold(qid, now=now - 1800)
    # example.org: two recipients the primary did not know right after its outage, held for review
    guard_ids = []
    for who in ("j.doe", "new.hire"):
        env = Envelope(sender="hr@recruiting.example", recipients=(Recipient(f"{who}@example.org"),))
        guard_ids.append(
            await spool.put(
                env,
                BodyBuffer.from_bytes(b"From: hr@recruiting.example\r\nSubject: Welcome aboard\r\n\r\nHello\r\n"),
                now=org_out[0] + 600,
            )
        )
    claims = await spool.claim_due(
        now=org_out[1] + 30, owner="seed", lease_seconds=60, limit=10, domains=["example.org"]
    )
    await spool.record(
        "seed",
        [
            RecipientUpdate(
                r.message_id,
                r.index,
                Deferred(
                    Reply(
                        550,
                        "5.1.1",
                        f"<{r.address}>: Recipient address rejected: User unknown in virtual mailbox table",
                    ),
                    guard_hold=True,
                ),
            )
            for c in claims
            for r in c.recipients
        ],
        now=org_out[1] + 40,
    )
    await spool.close()
    return {"out_start": out_start, "org_out": org_out, "arrivals": arrivals, "ids": ids, "guard": guard_ids}


def history(now: float, story: dict[str, Any], rng: random.Random) -> list[SeriesPoint]:
    """24 h of per-minute samples that agree with the seeded queue: example.com fills up from the start
    of its outage (two messages held by the operator half an hour ago); example.org fills during its
    short outage, drains at once when it ends, and keeps the two recipients the recovery guard held."""
    points: list[SeriesPoint] = []
    start = now - now % 60 - 24 * 3600
    com_arrivals: dict[int, int] = {}
    for at, n in story["arrivals"]:
        m = int(at - at % 60)
        com_arrivals[m] = com_arrivals.get(m, 0) + n
    held_com = sum(n for _, n in story["arrivals"][5:7])
    org0, org1 = story["org_out"]
    depth_com = depth_org = 0
    for i in range(24 * 60):
        t = start + i * 60
        busy = 0.6 if 7 <= (t % 86400) / 3600 <= 19 else 0.15  # office hours, UTC
        if t >= story["out_start"] - 60:
            arrived = com_arrivals.get(int(t), 0)
            depth_com += arrived
            held = held_com if t >= now - 1800 else 0
            points.append(SeriesPoint(t, "example.com", depth_com - held, held, arrived, 0, 0, 0))
        else:
            arrived = sum(1 for _ in range(3) if rng.random() < busy / 3)
            points.append(SeriesPoint(t, "example.com", 0, 0, arrived, arrived, 0, 0))
        arrived = sum(1 for _ in range(2) if rng.random() < busy / 4)
        if org0 <= t < org1:
            depth_org += arrived
            points.append(SeriesPoint(t, "example.org", depth_org, 0, arrived, 0, 0, 0))
        else:
            held = 2 if t >= org1 else 0
            delivered = arrived + max(depth_org - held, 0)
            depth_org = 0
            points.append(SeriesPoint(t, "example.org", 0, held, arrived, delivered, 0, 0))
    return points


async def test_screenshots_of_the_main_views(tmp_path: Path) -> None:
    target = REPO / "docs" if os.environ.get("BACKUPMX_SCREENSHOTS") == "docs" else tmp_path / "shots"
    target.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20261124)
    now = __import__("time").time()
    story = await seed(tmp_path / "data", now, rng)
    org_primary = await Primary(hostname="mx1.example.org").start()
    dead = f"127.0.0.1:{closed_port()}"
    async with running_node(
        tmp_path, {"example.com": dead, "example.org": org_primary.hostport}, hostname="mx2.example.net"
    ) as node:
        await node.admin.sampler.sample()
        node.admin.series.add(history(now, story, rng), now=now)
        await until(lambda: node.monitor.snapshot()["example.org"].state.value == "up", what="example.org up")
        await until(lambda: node.monitor.snapshot()["example.com"].last_error is not None, what="a failed probe")
        live = await asyncio.to_thread(
            node.send, ["anna@example.com", "ben@example.com"], "Quarterly report", sender="carla@customer.example"
        )
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                desk = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
                await login(desk, node)
                await desk.wait_for_selector(".banner.outage")
                assert "example.com" in await desk.inner_text(".banner.outage")
                await desk.screenshot(path=str(target / "dashboard-overview.png"), full_page=True)
                await desk.goto(node.url + "/queue?domain=example.com")
                await desk.screenshot(path=str(target / "dashboard-queue.png"))
                await desk.goto(node.url + "/domains/example.com")
                assert "declared since" in await desk.inner_text("dl.facts")
                await desk.screenshot(path=str(target / "dashboard-domain.png"), full_page=True)
                await desk.goto(node.url + f"/queue/{live}")
                assert "Quarterly report" in await desk.inner_text(".subject")
                await desk.screenshot(path=str(target / "dashboard-message.png"), full_page=True)
                await desk.goto(node.url + "/review")
                assert "new.hire@example.org" in await desk.inner_text("table.list")
                await desk.screenshot(path=str(target / "dashboard-review.png"), full_page=True)
                phone_ctx = await browser.new_context(
                    viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
                )
                phone = await phone_ctx.new_page()
                await login(phone, node)
                await phone.wait_for_selector(".banner.outage")
                await phone.screenshot(path=str(target / "dashboard-phone.png"))  # what a phone shows first
                await phone.goto(node.url + "/queue?domain=example.com")
                await phone.screenshot(path=str(target / "dashboard-phone-queue.png"))
            finally:
                await browser.close()
    await org_primary.stop()
    for name in ("overview", "queue", "domain", "message", "review", "phone", "phone-queue"):
        assert (target / f"dashboard-{name}.png").stat().st_size > 10_000
