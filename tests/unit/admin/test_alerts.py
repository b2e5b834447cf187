"""Alerts (monitor/alerts.py): configuration, each condition firing once and recovering once, delivery
of notices to a real webhook receiver and a real SMTP smarthost on loopback, bounded retries."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from pydantic import ValidationError

from backupmx.clock import FakeClock, SystemClock
from backupmx.config import Config
from backupmx.errors import ConfigError
from backupmx.maillog import MailLog
from backupmx.monitor import DestinationState
from backupmx.monitor.alerts import AlertConfig, AlertManager, Condition, check_alerts
from backupmx.spool import DomainStats, SpoolStats
from tests.unit.admin.harness import FakeHealth, admin_config


class Receiver:
    """A webhook endpoint on loopback that records every POST; `fail_first` answers 500 that many times."""

    def __init__(self, fail_first: int = 0) -> None:
        self.posts: list[dict[str, Any]] = []
        self.attempts = 0
        self.fail_first = fail_first
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts <= self.fail_first:
            return web.Response(status=500)
        self.posts.append(await request.json())
        return web.Response(status=204)


@asynccontextmanager
async def receiver(fail_first: int = 0) -> AsyncIterator[Receiver]:
    rec = Receiver(fail_first)
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield rec
    finally:
        await runner.cleanup()


class FakeStats:
    def __init__(self) -> None:
        self.domains: dict[str, DomainStats] = {}

    def set(self, domain: str, queued: int = 0, held: int = 0, oldest: float | None = None) -> None:
        self.domains[domain] = DomainStats(domain, {"queued": queued, "held": held}, 1 if queued + held else 0, oldest)

    async def stats(self) -> SpoolStats:
        return SpoolStats(0, {}, tuple(self.domains.values()), None, 0, 0)


def webhook(url: str, **kw: Any) -> AlertConfig:
    return AlertConfig.model_validate(
        {"kind": "webhook", "url": url, "interval": "1s", "retry_min": "1s", "free_disk_below": "1KB", **kw}
    )


def manager(
    cfg: Config,
    alerts: list[AlertConfig],
    clock: Any,
    health: FakeHealth,
    stats: FakeStats | None = None,
    maillog: MailLog | None = None,
) -> AlertManager:
    return AlertManager(alerts, config=cfg, spool=stats or FakeStats(), health=health, clock=clock, maillog=maillog)


def test_alert_config_is_validated_with_named_errors() -> None:
    assert AlertConfig.model_validate({"kind": "webhook", "url": "https://hooks.example/x"}).on == tuple(Condition)
    a = AlertConfig.model_validate(
        {
            "kind": "email",
            "smarthost": "smtp.example.net:587",
            "mail_from": "mx@ex.net",
            "to": ["ops@ex.net"],
            "on": "primary_down",
            "held_above": 10,
        }
    )
    assert a.on == (Condition.PRIMARY_DOWN,) and a.held_above == 10
    for bad in (
        {"kind": "webhook"},
        {"kind": "webhook", "url": "ftp://x"},
        {"kind": "email", "smarthost": "x:25"},
        {"kind": "sms", "url": "http://x"},
        {"kind": "webhook", "url": "http://x", "colour": "red"},
        {"kind": "webhook", "url": "http://x", "on": ["primary_sad"]},
        {"kind": "webhook", "url": "http://x", "interval": "0s"},
    ):
        with pytest.raises(ValidationError):
            AlertConfig.model_validate(bad)


def test_email_alerts_never_go_through_a_protected_primary_or_ourselves(tmp_path: Path) -> None:
    cfg = admin_config(tmp_path / "d")  # primaries are 127.0.0.1:1, SMTP listens on 127.0.0.1:2525
    mail = {"kind": "email", "mail_from": "mx@ex.net", "to": ["ops@ex.net"]}
    with pytest.raises(ConfigError, match=r"alerts\[0\]\.smarthost: 127\.0\.0\.1:1 is the primary of example\.test"):
        check_alerts(cfg, [AlertConfig.model_validate({**mail, "smarthost": "127.0.0.1:1"})])
    with pytest.raises(ConfigError, match="own SMTP listener"):
        check_alerts(cfg, [AlertConfig.model_validate({**mail, "smarthost": "127.0.0.1:2525"})])
    check_alerts(cfg, [AlertConfig.model_validate({**mail, "smarthost": "127.0.0.1:2587"})])


async def test_one_outage_gives_exactly_one_down_and_one_back_over_http(tmp_path: Path) -> None:
    clock = SystemClock()
    cfg = admin_config(tmp_path / "d")
    health = FakeHealth(clock)
    health.set("example.test", DestinationState.UP)
    health.set("other.test", DestinationState.UP)
    async with receiver() as rec:
        mgr = manager(cfg, [webhook(rec.url, on=["primary_down"])], clock, health)
        await mgr.start()
        try:
            await asyncio.sleep(1.5)  # a few quiet evaluations: nothing to say
            assert rec.posts == []
            now = time.time()
            health.set("example.test", DestinationState.DOWN, outage_since=now, error="connection refused")
            mgr.on_health_change("example.test", DestinationState.UP, DestinationState.DOWN)
            await _until(lambda: len(rec.posts) == 1)
            await asyncio.sleep(2.5)  # more evaluations while it stays down: no repeat
            health.set("example.test", DestinationState.RECOVERING)
            mgr.on_health_change("example.test", DestinationState.DOWN, DestinationState.RECOVERING)
            await _until(lambda: len(rec.posts) == 2)
            health.set("example.test", DestinationState.UP)
            mgr.on_health_change("example.test", DestinationState.RECOVERING, DestinationState.UP)
            await asyncio.sleep(2.5)
        finally:
            await mgr.stop()
    assert [(p["alert"], p["status"], p["domain"]) for p in rec.posts] == [
        ("primary_down", "firing", "example.test"),
        ("primary_down", "resolved", "example.test"),
    ]
    down, back = rec.posts
    assert "connection refused" in down["summary"] and down["node"] == "backup.test"
    assert back["summary"].startswith("primary of example.test is back after")
    assert down["text"].startswith("[backupmx backup.test]")


async def _until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_quick_down_and_up_between_evaluations_is_still_told(tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    health = FakeHealth(clock)
    health.set("example.test", DestinationState.UP)
    mgr = manager(admin_config(tmp_path / "d"), [webhook("http://127.0.0.1:9/", on=["primary_down"])], clock, health)
    mgr.on_health_change("example.test", DestinationState.UP, DestinationState.DOWN)
    clock.advance(5)
    mgr.on_health_change("example.test", DestinationState.DOWN, DestinationState.RECOVERING)
    notices = [n for _, n in await mgr.evaluate()]
    assert [(n.condition, n.firing) for n in notices] == [
        (Condition.PRIMARY_DOWN, True),
        (Condition.PRIMARY_DOWN, False),
    ]
    assert await mgr.evaluate() == []


async def test_a_restart_during_an_outage_does_not_announce_it_again(tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    cfg = admin_config(tmp_path / "d")
    health = FakeHealth(clock)
    health.set("example.test", DestinationState.DOWN, outage_since=clock.now())
    alerts = [webhook("http://127.0.0.1:9/", on=["primary_down"])]
    first = manager(cfg, alerts, clock, health)
    assert [n.firing for _, n in await first.evaluate()] == [True]
    # a new process: the monitor starts UNKNOWN (no information: no "back"), then DOWN again
    health2 = FakeHealth(clock)
    second = manager(cfg, alerts, clock, health2)
    assert second.firing() and await second.evaluate() == []
    health2.set("example.test", DestinationState.DOWN, outage_since=clock.now())
    assert await second.evaluate() == []
    health2.set("example.test", DestinationState.UP)
    assert [n.firing for _, n in await second.evaluate()] == [False]
    assert second.firing() == []


async def test_level_and_age_thresholds_fire_once_and_recover_once(tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    health = FakeHealth(clock)
    stats = FakeStats()
    for d in ("example.test", "other.test"):
        health.set(d, DestinationState.UP)
    a = webhook(
        "http://127.0.0.1:9/",
        held_above=100,
        oldest_older_than="1h",
        outage_longer_than="30m",
        on=["held_mail", "oldest_message", "outage_long"],
    )
    mgr = manager(admin_config(tmp_path / "d"), [a], clock, health, stats)
    stats.set("example.test", queued=90, held=5, oldest=clock.now())
    assert await mgr.evaluate() == []
    stats.set("example.test", queued=150, held=5, oldest=clock.now() - 10)
    got = [(n.condition, n.scope, n.firing) for _, n in await mgr.evaluate()]
    assert got == [(Condition.HELD_MAIL, "example.test", True)]
    stats.set("example.test", queued=95, held=0, oldest=clock.now() - 10)  # below 100 but above 90: hysteresis
    assert await mgr.evaluate() == []
    stats.set("example.test", queued=80, held=0, oldest=clock.now() - 4000)
    got = [(n.condition, n.firing) for _, n in await mgr.evaluate()]
    assert got == [(Condition.HELD_MAIL, False), (Condition.OLDEST_MESSAGE, True)]
    stats.set("example.test", queued=0, held=0, oldest=None)
    assert [(n.condition, n.firing) for _, n in await mgr.evaluate()] == [(Condition.OLDEST_MESSAGE, False)]
    # a declared outage older than 30 minutes
    health.set("other.test", DestinationState.DOWN, outage_since=clock.now())
    assert await mgr.evaluate() == []
    clock.advance(1801)
    got = [(n.condition, n.scope, n.firing) for _, n in await mgr.evaluate()]
    assert got == [(Condition.OUTAGE_LONG, "other.test", True)]
    assert "30m" in mgr.firing()[0]["summary"]  # type: ignore[operator]
    health.set("other.test", DestinationState.UP)
    assert [(n.condition, n.firing) for _, n in await mgr.evaluate()] == [(Condition.OUTAGE_LONG, False)]


async def test_mail_set_aside_fires_while_poison_or_guard_holds_exist(tmp_path: Path) -> None:
    """Held is not forgotten: on by default, fires while a recipient is held as poison or by the recovery
    guard (an operator's own hold does not), says how long, recovers when none is left."""
    clock = FakeClock(time.time())
    health = FakeHealth(clock)
    stats = FakeStats()
    for d in ("example.test", "other.test"):
        health.set(d, DestinationState.UP)
    mgr = manager(admin_config(tmp_path / "d"), [webhook("http://127.0.0.1:9/")], clock, health, stats)
    stats.domains["example.test"] = DomainStats(
        "example.test",
        {"held": 1},
        1,
        clock.now(),
        held_by_reason={"operator": 1},
        held_since={"operator": clock.now()},
    )
    assert [n for _, n in await mgr.evaluate() if n.condition is Condition.MAIL_SET_ASIDE] == []
    stats.domains["example.test"] = DomainStats(
        "example.test",
        {"held": 3},
        2,
        clock.now() - 7200,
        held_by_reason={"operator": 1, "poison": 2},
        held_since={"operator": clock.now(), "poison": clock.now() - 7200},
    )
    got = [n for _, n in await mgr.evaluate() if n.condition is Condition.MAIL_SET_ASIDE]
    assert [(n.scope, n.firing) for n in got] == [("example.test", True)]
    assert "2 recipients of example.test are set aside (poison: 2), the longest for 2h" in got[0].summary
    assert [n for _, n in await mgr.evaluate() if n.condition is Condition.MAIL_SET_ASIDE] == []  # once
    stats.domains["example.test"] = DomainStats("example.test", {}, 0, None)
    got = [n for _, n in await mgr.evaluate() if n.condition is Condition.MAIL_SET_ASIDE]
    assert [(n.scope, n.firing) for n in got] == [("example.test", False)]


async def test_free_disk_below_threshold(tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    health = FakeHealth(clock)
    mgr = manager(
        admin_config(tmp_path / "d"),
        [webhook("http://127.0.0.1:9/", free_disk_below=10**18, on=["free_disk"])],
        clock,
        health,
    )
    notices = [n for _, n in await mgr.evaluate()]
    assert [(n.condition, n.scope, n.firing) for n in notices] == [(Condition.FREE_DISK, "", True)]
    assert "free disk on backup.test is" in notices[0].summary
    assert await mgr.evaluate() == []


async def test_delivery_failing_while_the_primary_answers(tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    health = FakeHealth(clock)
    health.set("example.test", DestinationState.UP)
    maillog = MailLog(open("/dev/null", "w"))  # noqa: SIM115
    mgr = manager(
        admin_config(tmp_path / "d"),
        [webhook("http://127.0.0.1:9/", delivery_failures=3, on=["delivery_failing"])],
        clock,
        health,
        maillog=maillog,
    )
    for _ in range(5):  # the primary unreachable: the outage's business, not this alert's
        maillog.event("deferred", "Q1", to="<a@example.test>", dsn="4.4.1", reply="451 4.4.1 connect refused")
    assert await mgr.evaluate() == []
    for _ in range(3):
        maillog.event("deferred", "Q1", to="<a@example.test>", dsn="4.2.2", reply="452 4.2.2 mailbox full")
    notices = [n for _, n in await mgr.evaluate()]
    assert [(n.condition, n.scope, n.firing) for n in notices] == [(Condition.DELIVERY_FAILING, "example.test", True)]
    assert "452 4.2.2 mailbox full" in notices[0].summary
    maillog.event("deferred", "Q1", to="<a@example.test>", dsn="4.2.2", reply="452 4.2.2 mailbox full")
    assert await mgr.evaluate() == []
    maillog.event("delivered", "Q2", to="<canary@example.test>", dsn="2.0.0", reply="250 2.0.0 Ok", kind="canary")
    assert await mgr.evaluate() == []  # a canary delivered is no user mail delivered
    maillog.event("delivered", "Q1", to="<a@example.test>", dsn="2.0.0", reply="250 2.0.0 Ok")
    assert [(n.condition, n.firing) for _, n in await mgr.evaluate()] == [(Condition.DELIVERY_FAILING, False)]


async def test_delivery_failing_counts_user_mail_only(tmp_path: Path) -> None:
    """Refused canaries have their own condition (backup_path_broken); a DSN to a sender in a protected
    domain that fails is our mail, not a user's."""
    clock = FakeClock(time.time())
    health = FakeHealth(clock)
    health.set("example.test", DestinationState.UP)
    maillog = MailLog(open("/dev/null", "w"))  # noqa: SIM115
    mgr = manager(
        admin_config(tmp_path / "d"),
        [webhook("http://127.0.0.1:9/", delivery_failures=3, on=["delivery_failing"])],
        clock,
        health,
        maillog=maillog,
    )
    for _ in range(5):
        maillog.event(
            "bounced", "Q1", to="<canary@example.test>", dsn="5.1.1", reply="550 5.1.1 unknown", kind="canary"
        )
        maillog.event(
            "deferred", "Q2", to="<bob@example.test>", dsn="4.2.2", reply="452 4.2.2 mailbox full", kind="dsn"
        )
    assert await mgr.evaluate() == []
    assert mgr.failures.recent("example.test", 3600) == []


async def test_webhook_retries_with_backoff_then_gives_up(tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    health = FakeHealth(clock)
    health.set("example.test", DestinationState.DOWN, outage_since=clock.now())
    async with receiver(fail_first=2) as rec:
        mgr = manager(admin_config(tmp_path / "d"), [webhook(rec.url, on=["primary_down"], attempts=4)], clock, health)
        start = clock.now()
        await mgr.evaluate()
        await mgr.drain()
        assert rec.attempts == 3 and len(rec.posts) == 1
        assert clock.now() - start == pytest.approx(1 + 2)  # retry_min 1s, doubled
    async with receiver(fail_first=100) as rec:
        health.set("other.test", DestinationState.DOWN, outage_since=clock.now())
        mgr = manager(
            admin_config(tmp_path / "e"),
            [webhook(rec.url, on=["primary_down"], attempts=4, retry_max="2s")],
            clock,
            health,
        )
        start = clock.now()
        await mgr.evaluate()  # two domains down: two notices
        await mgr.drain()
        assert rec.attempts == 8 and rec.posts == []  # bounded: 4 attempts each, then given up
        assert clock.now() - start == pytest.approx(2 * (1 + 2 + 2))


class FakeCanary:
    """What the manager reads of `Canary`: {domain: why} while the backup path is broken."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}

    def broken(self) -> dict[str, str]:
        return dict(self.reasons)


REFUSED = (
    "backup path broken for example.test: the canary was bounced: "
    "550 5.1.1 <canary@example.test>: Recipient address rejected: User unknown"
)


async def test_a_canary_refused_then_fixed_gives_one_broken_and_one_recovery_over_http(tmp_path: Path) -> None:
    clock = SystemClock()
    health = FakeHealth(clock)
    health.set("example.test", DestinationState.UP)
    health.set("other.test", DestinationState.UP)
    canary = FakeCanary()
    async with receiver() as rec:
        mgr = AlertManager(
            [webhook(rec.url)],
            config=admin_config(tmp_path / "d"),
            spool=FakeStats(),
            health=health,
            clock=clock,
            canary=canary,
        )
        await mgr.start()
        try:
            await asyncio.sleep(1.5)  # a working path: nothing to say
            assert rec.posts == []
            canary.reasons["example.test"] = REFUSED
            await _until(lambda: len(rec.posts) == 1)
            await asyncio.sleep(2.5)  # still broken over more evaluations: no repeat
            assert mgr.firing()[0]["alert"] == "backup_path_broken"
            del canary.reasons["example.test"]  # the canary address is fixed: the next canary is delivered
            await _until(lambda: len(rec.posts) == 2)
            await asyncio.sleep(2.5)
        finally:
            await mgr.stop()
    assert [(p["alert"], p["status"], p["domain"]) for p in rec.posts] == [
        ("backup_path_broken", "firing", "example.test"),
        ("backup_path_broken", "resolved", "example.test"),
    ]
    broken, fixed = rec.posts
    assert broken["summary"] == REFUSED and broken["details"]["reason"] == REFUSED
    assert fixed["summary"].startswith("backup path for example.test works again: a canary was delivered after ")
    assert mgr.firing() == []


async def test_backup_path_broken_is_on_by_default_kept_across_a_restart_and_needs_a_canary(tmp_path: Path) -> None:
    clock = FakeClock(time.time())
    cfg = admin_config(tmp_path / "d")
    health = FakeHealth(clock)
    health.set("example.test", DestinationState.UP)
    alerts = [webhook("http://127.0.0.1:9/", free_disk_below="1B")]
    assert Condition.BACKUP_PATH_BROKEN in alerts[0].on
    canary = FakeCanary()
    canary.reasons["example.test"] = REFUSED
    first = AlertManager(alerts, config=cfg, spool=FakeStats(), health=health, clock=clock, canary=canary)
    got = [(n.condition, n.scope, n.firing) for _, n in await first.evaluate()]
    assert got == [(Condition.BACKUP_PATH_BROKEN, "example.test", True)]
    # a new process: the canary takes up its recorded state, still broken; nothing is told again
    second = AlertManager(alerts, config=cfg, spool=FakeStats(), health=health, clock=clock, canary=canary)
    assert await second.evaluate() == []
    # without a canary there is no information: the state is kept, not resolved
    blind = AlertManager(alerts, config=cfg, spool=FakeStats(), health=health, clock=clock)
    assert await blind.evaluate() == [] and blind.firing()[0]["alert"] == "backup_path_broken"
    canary.reasons.clear()
    clock.advance(90)
    notices = [n for _, n in await second.evaluate()]
    assert [(n.condition, n.firing) for n in notices] == [(Condition.BACKUP_PATH_BROKEN, False)]
    assert notices[0].summary == "backup path for example.test works again: a canary was delivered after 1m broken"
    # only the destinations that asked for it hear it
    only_down = AlertManager(
        [webhook("http://127.0.0.1:9/", on=["primary_down"])],
        config=admin_config(tmp_path / "e"),
        spool=FakeStats(),
        health=health,
        clock=clock,
        canary=canary,
    )
    canary.reasons["example.test"] = REFUSED
    assert await only_down.evaluate() == []


class _Smarthost:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Ok"


async def test_email_alert_goes_through_the_smarthost(tmp_path: Path) -> None:
    from tests.support.ports import free_port

    handler = _Smarthost()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        clock = FakeClock(time.time())
        health = FakeHealth(clock)
        health.set("example.test", DestinationState.DOWN, outage_since=clock.now(), error="connect refused")
        a = AlertConfig.model_validate(
            {
                "kind": "email",
                "smarthost": f"127.0.0.1:{port}",
                "mail_from": "mx@ops.test",
                "to": ["ops@ops.test", "pager@ops.test"],
                "on": ["primary_down"],
            }
        )
        mgr = manager(admin_config(tmp_path / "d"), [a], clock, health)
        await mgr.evaluate()
        await mgr.drain()
    finally:
        ctl.stop()
    assert len(handler.messages) == 1
    sender, rcpts, content = handler.messages[0]
    assert sender == "mx@ops.test" and rcpts == ["ops@ops.test", "pager@ops.test"]
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert msg["Subject"].startswith(
        "[backupmx backup.test] PROBLEM: primary of example.test is down (connect refused)"
    )
    assert msg["Auto-Submitted"] == "auto-generated"
    assert "state: down" in msg.get_content()


def test_the_notice_json_shape() -> None:
    from backupmx.monitor.alerts import Notice

    notice = Notice(Condition.HELD_MAIL, "example.test", True, "too much", 1_700_000_000.0, {"recipients": 5})
    doc = notice.to_json("n1")
    assert json.loads(json.dumps(doc)) == {
        "source": "backupmx",
        "node": "n1",
        "alert": "held_mail",
        "status": "firing",
        "domain": "example.test",
        "summary": "too much",
        "text": "[backupmx n1] too much",
        "at": "2023-11-14T22:13:20+00:00",
        "details": {"recipients": 5},
    }
