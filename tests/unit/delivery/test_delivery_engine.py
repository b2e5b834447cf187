"""The engine against a real SqliteSpool and aiosmtpd primaries, driven pass by pass with a FakeClock:
per-recipient outcomes, DSNs in the same commit, retries, recovery guard, expiry, delay notices."""

from __future__ import annotations

from collections.abc import AsyncIterator
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest

from backupmx.model import MessageKind, Recipient, RecipientState
from tests.unit.delivery.fake_primary import Primary, closed_port
from tests.unit.delivery.harness import BODY, Harness, make_config


@pytest.fixture
async def primary() -> AsyncIterator[Primary]:
    p = await Primary().start()
    yield p
    await p.stop()


@pytest.fixture
async def sink() -> AsyncIterator[Primary]:
    """The sender's MX, where DSNs arrive (sender.test is rerouted here)."""
    p = await Primary(hostname="sender-mx.test").start()
    yield p
    await p.stop()


async def harness(tmp_path: Path, primary: Primary | str, sink: Primary | None = None, **kw: object) -> Harness:
    target = primary.hostport if isinstance(primary, Primary) else primary
    h = await Harness(tmp_path, make_config(target, **kw)).open()  # type: ignore[arg-type]
    if sink is not None:
        h.engine.set_reroute("sender.test", [("127.0.0.1", sink.port)])
    return h


async def test_delivers_and_reuses_connection(tmp_path: Path, primary: Primary) -> None:
    h = await harness(tmp_path, primary)
    ids = [await h.put("alice@example.com", "bob@example.com") for _ in range(3)]
    assert await h.engine.run_once() == 6
    for qid in ids:
        assert {r.state for r in (await h.get(qid)).recipients} == {RecipientState.DELIVERED}
    assert primary.contents() == [BODY] * 3
    assert primary.sessions <= 2  # concurrency_initial
    delivered = h.events.named("delivered")
    assert len(delivered) == 6
    assert delivered[0]["relay"] == primary.hostport and delivered[0]["dsn"] == "2.0.0"
    assert "attempts" in delivered[0] and "delay" in delivered[0] and "reply" in delivered[0]
    stats = h.engine.statistics()
    assert stats.delivered == 6 and stats.destinations["example.com"].delivered == 6
    assert await h.engine.run_once() == 0  # nothing again: no duplicates
    assert len(primary.received) == 3
    await h.close()


async def test_several_messages_per_connection(tmp_path: Path, primary: Primary) -> None:
    h = await harness(
        tmp_path, primary, delivery={"concurrency_initial": 1, "concurrency_max": 1, "messages_per_connection": 4}
    )
    for _ in range(10):
        await h.put("a@example.com")
    await h.engine.run_once()
    assert len(primary.received) == 10
    assert primary.sessions == 3  # 4 + 4 + 2
    await h.close()


async def test_one_of_three_refused_gets_a_dsn(tmp_path: Path, primary: Primary, sink: Primary) -> None:
    primary.rcpt_rule = lambda a: "550 5.1.1 <b@example.com>: User unknown" if a == "b@example.com" else None
    h = await harness(tmp_path, primary, sink)
    qid = await h.put("a@example.com", "b@example.com", "c@example.com")
    await h.engine.run_once()
    states = [r.state for r in (await h.get(qid)).recipients]
    assert states == [RecipientState.DELIVERED, RecipientState.BOUNCED, RecipientState.DELIVERED]
    assert primary.received[0].rcpt_tos == ["a@example.com", "c@example.com"]
    # the DSN was queued in the same commit and delivered by the same engine, to the sender's MX
    assert len(sink.received) == 1
    dsn = sink.received[0]
    assert dsn.mail_from == "<>" and dsn.rcpt_tos == ["bob@sender.test"]
    report = BytesParser(policy=policy.default).parsebytes(dsn.content)
    status = report.get_payload()[1].get_payload()
    assert [b["Final-Recipient"] for b in status[1:]] == ["rfc822; b@example.com"]
    assert status[1]["Status"] == "5.1.1" and status[1]["Action"] == "failed"
    assert "User unknown" in str(status[1]["Diagnostic-Code"])
    dsns = await h.dsns()
    assert len(dsns) == 1 and dsns[0].recipients[0].state is RecipientState.DELIVERED
    assert len(h.events.named("bounced")) == 1
    await h.engine.run_once()
    assert len(sink.received) == 1 and len(primary.received) == 1
    await h.close()


async def test_451_per_recipient_is_retried_later(tmp_path: Path, primary: Primary) -> None:
    primary.rcpt_rule = lambda a: "451 4.2.0 mailbox busy" if a == "b@example.com" else None
    h = await harness(tmp_path, primary)
    qid = await h.put("a@example.com", "b@example.com")
    await h.engine.run_once()
    a, b = (await h.get(qid)).recipients
    assert a.state is RecipientState.DELIVERED
    assert b.state is RecipientState.QUEUED and b.attempts == 1
    assert 54 <= b.next_attempt_at - h.clock.now() <= 66  # retry_min ±10 %
    assert "451 4.2.0" in (b.last_reply or "")
    deferred = h.events.named("deferred")
    assert len(deferred) == 1 and deferred[0]["to"] == "<b@example.com>"
    assert await h.engine.run_once() == 0  # not due yet
    primary.rcpt_rule = None
    h.fake.advance(70)
    await h.engine.run_once()
    assert (await h.rcpt(qid, 1)).state is RecipientState.DELIVERED
    assert [r.rcpt_tos for r in primary.received] == [["a@example.com"], ["b@example.com"]]
    assert await h.dsns() == []
    await h.close()


async def test_421_defers_without_dsn(tmp_path: Path, primary: Primary, sink: Primary) -> None:
    primary.mail_reply = "421 4.3.2 try again later"
    h = await harness(tmp_path, primary, sink)
    qid = await h.put("a@example.com", "b@example.com")
    await h.engine.run_once()
    assert {r.state for r in (await h.get(qid)).recipients} == {RecipientState.QUEUED}
    assert await h.dsns() == [] and sink.received == []
    assert h.engine.statistics().destinations["example.com"].concurrency == 1  # shrank from 2
    await h.close()


async def test_554_after_dot_bounces_every_recipient(tmp_path: Path, primary: Primary, sink: Primary) -> None:
    async def spam(_: object) -> str:
        return "554 5.7.1 Message rejected as spam"

    primary.data_rule = spam
    h = await harness(tmp_path, primary, sink)
    qid = await h.put("a@example.com", "b@example.com")
    await h.engine.run_once()
    assert {r.state for r in (await h.get(qid)).recipients} == {RecipientState.BOUNCED}
    assert len(sink.received) == 1  # one DSN listing both
    report = BytesParser(policy=policy.default).parsebytes(sink.received[0].content)
    assert len(report.get_payload()[1].get_payload()) == 3
    await h.close()


async def test_drop_mid_data_then_delivered_once(tmp_path: Path, primary: Primary) -> None:
    primary.drop_in_data = True
    h = await harness(tmp_path, primary)
    qid = await h.put("a@example.com", "b@example.com")
    await h.engine.run_once()
    assert {r.state for r in (await h.get(qid)).recipients} == {RecipientState.QUEUED}
    assert primary.received == []
    primary.drop_in_data = False
    h.fake.advance(120)
    await h.engine.run_once()
    assert {r.state for r in (await h.get(qid)).recipients} == {RecipientState.DELIVERED}
    assert len(primary.received) == 1 and primary.received[0].content == BODY
    await h.close()


async def test_slow_primary_no_false_retry(tmp_path: Path, primary: Primary) -> None:
    """The reply to the dot takes 3 s; command_timeout 1 s, data_timeout 10 s: one delivery."""
    primary.data_delay = 3.0
    h = await harness(tmp_path, primary, delivery={"command_timeout": "1s", "data_timeout": "10s"})
    qid = await h.put("a@example.com")
    await h.engine.run_once()
    assert (await h.rcpt(qid)).state is RecipientState.DELIVERED
    assert len(primary.received) == 1 and primary.data_started == 1
    await h.close()


async def test_null_sender_and_notify_never_get_no_dsn(tmp_path: Path, primary: Primary, sink: Primary) -> None:
    primary.rcpt_rule = lambda a: "550 5.1.1 unknown"
    h = await harness(tmp_path, primary, sink)
    q1 = await h.put("a@example.com", sender="")
    q2 = await h.put(Recipient("b@example.com", notify=("NEVER",)))
    await h.engine.run_once()
    assert (await h.rcpt(q1)).state is RecipientState.BOUNCED
    assert (await h.rcpt(q2)).state is RecipientState.BOUNCED
    assert await h.dsns() == [] and sink.received == []
    await h.close()


async def test_relayed_dsn_when_primary_lacks_dsn(tmp_path: Path, primary: Primary, sink: Primary) -> None:
    h = await harness(tmp_path, primary, sink)
    await h.put(Recipient("a@example.com", notify=("SUCCESS", "FAILURE")))
    await h.engine.run_once()
    assert len(sink.received) == 1
    report = BytesParser(policy=policy.default).parsebytes(sink.received[0].content)
    assert report.get_payload()[1].get_payload()[1]["Action"] == "relayed"
    await h.close()


async def test_no_relayed_dsn_when_primary_offers_dsn(tmp_path: Path, sink: Primary) -> None:
    p = await Primary(dsn=True).start()
    try:
        h = await harness(tmp_path, p, sink)
        await h.put(
            Recipient("a@example.com", notify=("SUCCESS",), orcpt="rfc822;a@example.com"), ret="HDRS", envid="E1"
        )
        await h.engine.run_once()
        assert sink.received == []
        assert p.received[0].dsn_rcpt["a@example.com"] == {"NOTIFY": "SUCCESS", "ORCPT": "rfc822;a@example.com"}
        assert p.received[0].dsn_mail == {"RET": "HDRS", "ENVID": "E1"}
        await h.close()
    finally:
        await p.stop()


async def test_dsn_of_failed_dsn_is_never_sent(tmp_path: Path, primary: Primary, sink: Primary) -> None:
    primary.rcpt_rule = lambda a: "550 5.1.1 unknown"
    sink.rcpt_rule = lambda a: "550 5.1.1 no such sender"
    h = await harness(tmp_path, primary, sink)
    await h.put("a@example.com")
    await h.engine.run_once()
    dsns = await h.dsns()
    assert len(dsns) == 1 and dsns[0].recipients[0].state is RecipientState.BOUNCED
    assert len(await h.dsns()) == 1  # no DSN about the DSN
    await h.close()


async def test_recovery_guard_holds_then_bounces_outside(tmp_path: Path, primary: Primary, sink: Primary) -> None:
    primary.rcpt_rule = lambda a: "550 5.1.1 User unknown (LDAP not synced)"
    h = await harness(tmp_path, primary, sink, delivery={"recovery_guard": "6h"})
    # an outage, declared, then over: the primary answers again
    await h.monitor.force_down("example.com", "drill")
    assert not h.monitor.is_deliverable("example.com")
    h.fake.advance(600)
    await h.monitor.clear_force("example.com")
    assert h.monitor.is_deliverable("example.com")
    assert h.monitor.in_recovery_guard("example.com")
    qid = await h.put("a@example.com")
    await h.engine.run_once()
    r = await h.rcpt(qid)
    assert r.state is RecipientState.HELD and r.held_reason == "recovery-guard"
    assert await h.dsns() == [] and sink.received == []
    held = h.events.named("held")
    assert len(held) == 1 and held[0]["reason"] == "recovery-guard"
    # past the window a 5xx bounces
    h.fake.advance(6 * 3600 + 1)
    assert not h.monitor.in_recovery_guard("example.com")
    await h.spool.release_held(qid, reason="recovery-guard", now=h.clock.now())
    await h.engine.run_once()
    assert (await h.rcpt(qid)).state is RecipientState.BOUNCED
    assert len(sink.received) == 1
    await h.close()


async def test_smtputf8_without_support_bounces_5_6_7(tmp_path: Path, sink: Primary) -> None:
    p = await Primary(smtputf8=False).start()
    try:
        h = await harness(tmp_path, p, sink)
        qid = await h.put("jöe@example.com", smtputf8=True, body="Subject: é\r\n\r\nx\r\n".encode())
        await h.engine.run_once()
        r = await h.rcpt(qid)
        assert r.state is RecipientState.BOUNCED and "5.6.7" in (r.last_reply or "")
        assert len(sink.received) == 1
        await h.close()
    finally:
        await p.stop()


async def test_primary_unreachable_defers_everything_no_dsn(tmp_path: Path, sink: Primary) -> None:
    h = await harness(tmp_path, f"127.0.0.1:{closed_port()}", sink, delivery={"down_after": 10})
    ids = [await h.put("a@example.com") for _ in range(5)]
    await h.engine.run_once()
    for qid in ids:
        r = await h.rcpt(qid)
        assert r.state is RecipientState.QUEUED and r.attempts == 1
        assert "refused" in (r.last_reply or "").lower()
    assert await h.dsns() == []
    assert h.monitor.status("example.com").consecutive_failures >= 1  # fed by deliveries
    await h.close()


async def test_going_down_mid_round_spends_no_more_attempts(tmp_path: Path) -> None:
    h = await harness(tmp_path, f"127.0.0.1:{closed_port()}", delivery={"down_after": 1, "concurrency_initial": 1})
    ids = [await h.put("a@example.com") for _ in range(5)]
    await h.engine.run_once()
    assert not h.monitor.is_deliverable("example.com")  # the refused connection declared it DOWN
    attempts = [(await h.rcpt(q)).attempts for q in ids]
    assert attempts == [0, 0, 0, 0, 0]  # released, not deferred: nothing counted
    await h.close()


async def test_nothing_claimed_while_down(tmp_path: Path, primary: Primary) -> None:
    h = await harness(tmp_path, primary)
    await h.monitor.force_down("example.com", "drill")
    qid = await h.put("a@example.com")
    assert await h.engine.run_once() == 0
    r = await h.rcpt(qid)
    assert r.attempts == 0 and r.state is RecipientState.QUEUED
    assert primary.sessions == 0
    outages = await h.spool.outages("example.com")
    assert len(outages) == 1 and outages[0].ended_at is None
    await h.monitor.clear_force("example.com")  # probe succeeds: RECOVERING, flushed
    await h.engine.run_once()
    assert (await h.rcpt(qid)).state is RecipientState.DELIVERED
    assert (await h.spool.outages("example.com"))[0].ended_at is not None
    await h.close()


async def test_expiry_after_retention_with_dsn(tmp_path: Path, sink: Primary) -> None:
    h = await harness(
        tmp_path,
        f"127.0.0.1:{closed_port()}",
        sink,
        delivery={"retention": "2d", "retention_cap": "5d", "down_after": 1000},
    )
    qid = await h.put("a@example.com")
    for _ in range(3):
        await h.engine.run_once()
        h.fake.advance(3600 * 12)
    assert (await h.rcpt(qid)).state is RecipientState.QUEUED
    h.fake.advance(3600 * 13)  # 2 days + 1 hour since arrival
    await h.engine.run_once()
    r = await h.rcpt(qid)
    assert r.state is RecipientState.EXPIRED
    assert len(sink.received) == 1
    report = BytesParser(policy=policy.default).parsebytes(sink.received[0].content)
    assert report.get_payload()[1].get_payload()[1]["Status"] == "4.4.7"
    assert len(h.events.named("expired")) == 1
    await h.close()


async def test_declared_outage_pauses_retention_up_to_the_cap(tmp_path: Path, sink: Primary) -> None:
    h = await harness(tmp_path, f"127.0.0.1:{closed_port()}", sink, delivery={"retention": "2d", "retention_cap": "5d"})
    qid = await h.put("a@example.com")
    await h.monitor.force_down("example.com", "outage")  # declared at arrival
    h.fake.advance(86400 * 4)
    await h.engine.run_once()  # sweeps the DOWN destination: under the cap, nothing happens
    r = await h.rcpt(qid)
    assert r.state is RecipientState.QUEUED and r.attempts == 0
    h.fake.advance(86400 + 1)
    await h.engine.run_once()  # past the hard cap: expires without an attempt, with a DSN
    assert (await h.rcpt(qid)).state is RecipientState.EXPIRED
    assert len(sink.received) == 1
    await h.close()


async def test_delay_warning_once_per_message(tmp_path: Path, primary: Primary, sink: Primary) -> None:
    primary.rcpt_rule = lambda a: "451 4.3.0 temporarily unavailable"
    h = await harness(tmp_path, primary, sink, delivery={"delay_warning": "1h", "retry_max": "10m"})
    qid = await h.put("a@example.com", "b@example.com")
    await h.engine.run_once()
    assert sink.received == []
    for _ in range(10):
        h.fake.advance(601)
        await h.engine.run_once()
    assert len(sink.received) == 1
    report = BytesParser(policy=policy.default).parsebytes(sink.received[0].content)
    parts = report.get_payload()
    assert "Delayed" in report["Subject"] and "outage" in parts[0].get_content()
    blocks = parts[1].get_payload()
    assert {b["Action"] for b in blocks[1:]} == {"delayed"} and len(blocks) == 3
    assert all(r.delay_notified for r in (await h.get(qid)).recipients)
    await h.close()


async def test_delay_warning_while_down(tmp_path: Path, primary: Primary, sink: Primary) -> None:
    h = await harness(tmp_path, primary, sink, delivery={"delay_warning": "1h"})
    qid = await h.put("a@example.com")
    await h.monitor.force_down("example.com", "outage")
    h.fake.advance(3601)
    await h.engine.run_once()
    assert len(sink.received) == 1
    await h.engine.run_once()
    h.fake.advance(7200)
    await h.engine.run_once()
    assert len(sink.received) == 1  # at most one
    assert primary.sessions == 0  # no attempt against the DOWN primary
    await h.monitor.clear_force("example.com")
    await h.engine.run_once()
    assert (await h.rcpt(qid)).state is RecipientState.DELIVERED
    await h.close()


async def test_dsn_routed_by_mx(tmp_path: Path, primary: Primary, sink: Primary) -> None:
    """Without a reroute the DSN goes to the sender domain's MX (a fake DNS pointing at the sink)."""
    from backupmx.delivery.route import RouteResolver
    from backupmx.delivery.scheduler import DeliveryEngine
    from tests.unit.delivery.test_delivery_route import FakeDns

    primary.rcpt_rule = lambda a: "550 5.1.1 unknown"
    h = await harness(tmp_path, primary)
    dns = FakeDns({"sender.test": [(10, "mx.sender.test")]}, {"mx.sender.test": ["127.0.0.1"]})
    h.resolver = RouteResolver(h.config, dns, mx_port=sink.port)
    h.engine = DeliveryEngine(h.config, h.spool, h.clock, h.maillog, h.monitor, h.resolver, owner="test")
    await h.put("a@example.com")
    await h.engine.run_once()
    assert len(sink.received) == 1 and sink.received[0].mail_from == "<>"
    dsn = (await h.dsns())[0]
    assert dsn.kind is MessageKind.DSN and dsn.recipients[0].state is RecipientState.DELIVERED
    await h.close()


async def test_window_bounds_memory(tmp_path: Path, primary: Primary) -> None:
    h = await harness(tmp_path, primary, delivery={"window": 10})
    for _ in range(35):
        await h.put("a@example.com")
    seen: list[int] = []
    orig = h.spool.claim_due

    async def spy(**kw: object) -> list:  # type: ignore[type-arg]
        seen.append(int(kw["limit"]))  # type: ignore[call-overload]
        return await orig(**kw)  # type: ignore[arg-type]

    h.spool.claim_due = spy  # type: ignore[method-assign]
    await h.engine.run_once()
    assert len(primary.received) == 35
    assert max(seen) <= 10
    await h.close()


async def test_reroute(tmp_path: Path, primary: Primary) -> None:
    other = await Primary(hostname="other.test").start()
    try:
        h = await harness(tmp_path, primary)
        h.engine.set_reroute("example.com", [("127.0.0.1", other.port)])
        await h.monitor.force_down("example.com", "primary lost")  # rerouted mail goes anyway
        await h.put("a@example.com")
        await h.engine.run_once()
        assert len(other.received) == 1 and primary.received == []
        assert h.engine.statistics().destinations["example.com"].reroute == f"127.0.0.1:{other.port}"
        h.engine.set_reroute("example.com", None)
        await h.close()
    finally:
        await other.stop()


async def test_backlog_at_one_primary_does_not_starve_another(tmp_path: Path, primary: Primary) -> None:
    from backupmx.config import config_from_dict

    fast = await Primary(hostname="fast.test").start()
    try:
        primary.data_delay = 0.02
        cfg = config_from_dict(
            {
                "server": {"hostname": "backup.test", "listen": ["127.0.0.1:2999"]},
                "domains": [
                    {"name": "example.com", "primary": [primary.hostport]},
                    {"name": "other.com", "primary": [fast.hostport]},
                ],
                "delivery": {"window": 10, "concurrency_initial": 1, "concurrency_max": 1},
            }
        )
        h = await Harness(tmp_path, cfg).open()
        for _ in range(50):
            await h.put("a@example.com")
        await h.put("b@other.com")  # arrives last, behind a backlog of 50
        await h.engine.run_once()
        order = [str(f["to"]) for f in h.events.named("delivered")]
        assert len(order) == 51
        assert order.index("<b@other.com>") < 20  # not after the whole backlog
        await h.close()
    finally:
        await fast.stop()


async def test_own_mail_is_tagged_with_its_kind_in_the_mail_log(
    tmp_path: Path, primary: Primary, sink: Primary
) -> None:
    """User mail's events carry no kind; a DSN's and a canary's say kind=dsn / kind=canary, so statistics
    (admin/mailevents.py, the delivery_failing alert) can leave them out of the user-mail totals."""
    from backupmx.admin.mailevents import MailEvent, MailTally, ReasonClass

    primary.rcpt_rule = lambda a: "550 5.1.1 unknown" if a.startswith("b@") or a.startswith("canary@") else None
    h = await harness(tmp_path, primary, sink)
    tally = MailTally(["example.com"])
    h.maillog.subscribe(tally.listener)
    await h.put("a@example.com", "b@example.com")  # b bounces: a DSN to the sender
    await h.put("canary@example.com", sender="", kind=MessageKind.CANARY)  # refused: no DSN (null sender)
    await h.engine.run_once()
    kinds = {(e, f["to"], f.get("kind")) for e, f in h.events.items if e in ("delivered", "bounced")}
    assert kinds == {
        ("delivered", "<a@example.com>", None),
        ("bounced", "<b@example.com>", None),
        ("delivered", "<bob@sender.test>", "dsn"),
        ("bounced", "<canary@example.com>", "canary"),
    }
    assert tally.counts() == {
        (MailEvent.DELIVERED, "example.com", ReasonClass.OK): 1,
        (MailEvent.BOUNCED, "example.com", ReasonClass.ADDRESS): 1,
    }
    assert tally.own_counts() == {
        (MessageKind.DSN, MailEvent.DELIVERED, ReasonClass.OK): 1,
        (MessageKind.CANARY, MailEvent.BOUNCED, ReasonClass.ADDRESS): 1,
    }
    await h.close()
