"""The canary against the real SMTP listener and a real SQLite spool on loopback. The test plays the
delivery engine (claims the canary and records the primary's answer), so each outcome is chosen exactly:
delivered with its latency, refused (550), held, stuck past the deadline, caught by an outage."""

from __future__ import annotations

import asyncio
import io
import smtplib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from backupmx.clock import SystemClock
from backupmx.config import Config, config_from_dict
from backupmx.maillog import MailLog
from backupmx.model import Bounced, Deferred, Delivered, Envelope, MessageKind, Recipient
from backupmx.monitor import DestinationState, DestinationStatus
from backupmx.monitor.canary import HEADER, Canary, CanaryOutcome, CanaryStage, load_secret, mark, read_status
from backupmx.policy.domains import build_checks
from backupmx.reply import Reply
from backupmx.smtp.server import SmtpServer
from backupmx.spool import BodyBuffer, QueueFilter, RecipientUpdate
from backupmx.spool.sqlite import SqliteSpool

DOMAIN = "example.test"
CANARY = "canary@example.test"


@dataclass
class Health:
    state: DestinationState = DestinationState.UP

    def snapshot(self) -> Mapping[str, DestinationStatus]:
        return {DOMAIN: DestinationStatus(DOMAIN, self.state, 0.0, None, None, None, None, 0)}


@dataclass
class Node:
    cfg: Config
    spool: SqliteSpool
    server: SmtpServer
    health: Health
    canary: Canary
    events: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def named(self, event: str) -> list[dict[str, object]]:
        return [f for e, f in self.events if e == event]

    async def play_primary(
        self, outcome: Delivered | Bounced | Deferred, *, after: float = 0.0, timeout: float = 5.0
    ) -> None:
        """Be the delivery engine once: claim the next due recipient and record `outcome` for it."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            claims = await self.spool.claim_due(now=SystemClock().now(), owner="test", lease_seconds=30, limit=10)
            if claims:
                await asyncio.sleep(after)
                await self.spool.record(
                    "test",
                    [
                        RecipientUpdate(c.message.id, r.index, outcome, next_attempt_at=SystemClock().now() + 3600)
                        for c in claims
                        for r in c.recipients
                    ],
                    now=SystemClock().now(),
                )
                return
            await asyncio.sleep(0.02)
        raise AssertionError("nothing to claim")


def make_config(tmp_path: Path, *, recipients: object = "any", deadline: str = "3s") -> Config:
    return config_from_dict(
        {
            "server": {
                "hostname": "backup.test",
                "listen": ["127.0.0.1:0"],
                "data_dir": str(tmp_path),
                "min_free_disk": "1MB",
            },
            "domains": [{"name": DOMAIN, "primary": ["127.0.0.1:9"], "recipients": recipients}],
            "canary": [{"domain": DOMAIN, "to": CANARY, "interval": "1s", "deadline": deadline}],
        }
    )


@pytest.fixture
async def node(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Node]:
    params = getattr(request, "param", {})
    cfg = make_config(tmp_path, **params)
    spool = SqliteSpool(tmp_path, node=cfg.server.node)
    await spool.open()
    maillog = MailLog(io.StringIO(), node="backup.test")
    server = SmtpServer(config=cfg, spool=spool, checks=build_checks(cfg), maillog=maillog, clock=SystemClock())
    health = Health()
    canary = Canary(cfg, spool, health, maillog, SystemClock(), server, poll=0.02)
    server.classify = canary.classify
    n = Node(cfg, spool, server, health, canary)
    maillog.subscribe(lambda e, f: n.events.append((e, dict(f))))
    await server.start()
    try:
        yield n
    finally:
        await server.stop(grace=1)
        await spool.close()


async def test_delivered_canary_is_kind_canary_and_records_reply_and_latency(node: Node) -> None:
    primary = asyncio.create_task(node.play_primary(Delivered(Reply(250, "2.0.0", "Ok: queued as P1")), after=0.2))
    result = await node.canary.run_once(DOMAIN)
    await primary
    assert result.outcome is CanaryOutcome.DELIVERED, result
    assert result.reply == "250 2.0.0 Ok: queued as P1"
    assert result.latency is not None and 0.2 <= result.latency < 3
    assert result.queue_id is not None
    rec = await node.spool.get(result.queue_id)  # type: ignore[arg-type]
    assert rec is not None and rec.kind is MessageKind.CANARY and rec.envelope.sender == ""
    body = await node.spool.read_body(rec.id)
    assert f"{HEADER}: node=backup.test; domain={DOMAIN}; id=".encode() in body
    assert await node.spool.count_pending() == 0  # never user mail in the statistics
    stored = await read_status(node.spool, "backup.test", DOMAIN)
    assert stored is not None and stored.last == result and not stored.broken
    assert stored.last_latency == result.latency
    assert [f["result"] for f in node.named("canary")] == ["delivered"]
    assert node.named("queued")[0]["kind"] == "canary"
    assert not node.named("canary-alert")


async def test_a_copied_or_forged_mark_is_user_mail(node: Node) -> None:
    primary = asyncio.create_task(node.play_primary(Delivered(Reply(250, "2.0.0", "Ok"))))
    result = await node.canary.run_once(DOMAIN)
    await primary
    assert result.queue_id is not None
    original = await node.spool.read_body(result.queue_id)  # type: ignore[arg-type]
    head = original.split(b"\r\n\r\n", 1)[0]
    mark_line = next(line for line in head.split(b"\r\n") if line.startswith(HEADER.encode()))
    forged = mark_line.replace(b"sig=", b"sig=0")[: len(mark_line)]
    host, port = node.server.bound[0]
    for line in (mark_line, forged):  # a replay of the real mark, and a forged signature
        msg = line + b"\r\nSubject: hello\r\n\r\nbody\r\n"
        await asyncio.to_thread(_send, host, port, msg)
    users = await node.spool.list_messages(QueueFilter(kind="user"))
    assert len(users) == 2 and all(m.kind is MessageKind.USER for m in users)
    assert await node.spool.count_pending() == 2


async def test_classify_needs_our_signature_an_id_in_flight_and_the_canary_address(node: Node) -> None:
    secret = load_secret(node.cfg.server.data_dir)
    user = Envelope("", (Recipient(CANARY),))

    def body(value: str) -> BodyBuffer:
        return BodyBuffer.from_bytes(f"Received: from x\r\n\tby y\r\n{HEADER}: {value}\r\n\r\nhi\r\n".encode())

    good = mark(secret, "backup.test", DOMAIN, "1-abc")
    node.canary._outstanding["1-abc"] = DOMAIN  # as while run_once hands the message over
    assert node.canary.classify(user, body(mark(b"x" * 32, "backup.test", DOMAIN, "1-abc"))).kind is MessageKind.USER
    assert node.canary.classify(user, body(mark(secret, "backup.test", DOMAIN, "2-abc"))).kind is MessageKind.USER
    assert node.canary.classify(user, body(mark(secret, "other.node", DOMAIN, "1-abc"))).kind is MessageKind.USER
    two = Envelope("", (Recipient(CANARY), Recipient("alice@example.test")))
    assert node.canary.classify(two, body(good)).kind is MessageKind.USER
    assert node.canary.classify(user, body(good)).kind is MessageKind.CANARY
    assert node.canary.classify(user, body(good)).kind is MessageKind.USER  # once per id


def _send(host: str, port: int, msg: bytes) -> None:
    with smtplib.SMTP(host, port, timeout=10) as s:
        s.sendmail("someone@sender.test", [CANARY], msg)


async def test_refused_canary_fires_the_alert_once_and_a_delivered_one_resolves_it_once(node: Node) -> None:
    refused = Bounced(Reply(550, "5.1.1", "<canary@example.test>: Recipient address rejected"))
    outcomes = [refused, refused, Delivered(Reply(250, "2.0.0", "Ok")), Delivered(Reply(250, "2.0.0", "Ok"))]
    results = []
    for outcome in outcomes:
        primary = asyncio.create_task(node.play_primary(outcome))
        results.append(await node.canary.run_once(DOMAIN))
        await primary
        if len(results) == 1:
            assert "backup path broken" in node.canary.broken()[DOMAIN]
            assert "550 5.1.1" in node.canary.broken()[DOMAIN]
    assert [r.outcome for r in results] == [CanaryOutcome.FAILED] * 2 + [CanaryOutcome.DELIVERED] * 2
    assert results[0].stage is CanaryStage.RELAY and results[0].reply and results[0].reply.startswith("550 5.1.1")
    alerts = node.named("canary-alert")
    assert [a["status"] for a in alerts] == ["firing", "resolved"]
    assert "backup path broken for example.test" in str(alerts[0]["summary"])
    assert node.canary.broken() == {}
    snap = node.canary.snapshot()[DOMAIN]
    assert dict(snap.runs) == {"failed": 2, "delivered": 2}


async def test_still_queued_at_the_deadline_while_up_fails_and_leaves_the_queue(node: Node) -> None:
    primary = asyncio.create_task(node.play_primary(Deferred(Reply(451, "4.3.0", "try later"))))
    result = await node.canary.run_once(DOMAIN)  # deadline 3s
    await primary
    assert result.outcome is CanaryOutcome.FAILED and result.stage is CanaryStage.DEADLINE
    assert result.reply == "451 4.3.0 try later"
    assert await node.spool.get(result.queue_id) is None  # type: ignore[arg-type]
    assert [a["status"] for a in node.named("canary-alert")] == ["firing"]


async def test_held_by_the_recovery_guard_is_a_failure(node: Node) -> None:
    guard = Deferred(Reply(550, "5.1.1", "unknown user"), guard_hold=True)
    primary = asyncio.create_task(node.play_primary(guard))
    result = await node.canary.run_once(DOMAIN)
    await primary
    assert result.outcome is CanaryOutcome.FAILED and "held (recovery-guard)" in result.detail
    assert await node.spool.get(result.queue_id) is None  # type: ignore[arg-type]


async def test_an_outage_during_the_wait_is_inconclusive_and_raises_nothing(node: Node) -> None:
    async def outage() -> None:
        await asyncio.sleep(0.3)
        node.health.state = DestinationState.DOWN

    task = asyncio.create_task(outage())
    result = await node.canary.run_once(DOMAIN)
    await task
    assert result.outcome is CanaryOutcome.INCONCLUSIVE
    assert node.canary.broken() == {} and not node.named("canary-alert")
    assert await node.spool.get(result.queue_id) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("node", [{"recipients": ["alice@example.test"]}], indirect=True)
async def test_our_own_listener_refusing_the_canary_is_a_failure(node: Node) -> None:
    result = await node.canary.run_once(DOMAIN)
    assert result.outcome is CanaryOutcome.FAILED and result.stage is CanaryStage.LISTENER
    assert result.reply is not None and result.reply.startswith("550"), result
    assert [a["status"] for a in node.named("canary-alert")] == ["firing"]


async def test_no_canary_while_the_primary_is_down_and_none_after_stop(node: Node) -> None:
    node.health.state = DestinationState.DOWN
    runner = asyncio.create_task(node.canary.run())
    await asyncio.sleep(1.5)
    assert not node.named("canary") and not node.named("queued")
    node.canary.stop()
    await asyncio.wait_for(runner, timeout=5)


async def test_the_loop_sends_one_canary_per_interval(node: Node) -> None:
    async def primary() -> None:
        for _ in range(2):
            await node.play_primary(Delivered(Reply(250, "2.0.0", "Ok")))

    helper = asyncio.create_task(primary())
    runner = asyncio.create_task(node.canary.run())
    await asyncio.wait_for(helper, timeout=10)
    node.canary.stop()
    await asyncio.wait_for(runner, timeout=5)
    sent = [f["queue_id"] for f in node.named("queued")]
    assert len(sent) == 2
    assert [f["result"] for f in node.named("canary")] == ["delivered", "delivered"]


async def test_a_restart_does_not_announce_a_firing_alert_again(node: Node, tmp_path: Path) -> None:
    primary = asyncio.create_task(node.play_primary(Bounced(Reply(550, "5.1.1", "no"))))
    await node.canary.run_once(DOMAIN)
    await primary
    again = Canary(node.cfg, node.spool, node.health, MailLog(io.StringIO()), SystemClock(), node.server)
    await again.open()
    assert DOMAIN in again.broken()
    node.server.classify = again.classify
    seen: list[str] = []
    again._maillog.subscribe(lambda e, f: seen.append(f"{e}:{f.get('status', '')}"))
    primary = asyncio.create_task(node.play_primary(Bounced(Reply(550, "5.1.1", "no"))))
    await again.run_once(DOMAIN)
    await primary
    assert "canary-alert:firing" not in seen
    primary = asyncio.create_task(node.play_primary(Delivered(Reply(250, "2.0.0", "Ok"))))
    await again.run_once(DOMAIN)
    await primary
    assert seen.count("canary-alert:resolved") == 1


async def test_metrics(node: Node) -> None:
    primary = asyncio.create_task(node.play_primary(Bounced(Reply(550, "5.1.1", "no"))))
    await node.canary.run_once(DOMAIN)
    await primary
    registry = CollectorRegistry(auto_describe=False)
    registry.register(node.canary.collector())
    text = generate_latest(registry).decode()
    assert 'backupmx_backup_path_broken{domain="example.test"} 1.0' in text
    assert 'backupmx_canary_runs_total{domain="example.test",outcome="failed"} 1.0' in text
    assert 'backupmx_canary_last_success_timestamp_seconds{domain="example.test"} 0.0' in text
