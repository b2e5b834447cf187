"""The engine's parts on their own: plan() (a transaction's result -> one update per recipient and the
DSNs owed), the Window's bookkeeping, slow start's feedback and the statistics snapshot."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from random import Random

from backupmx.delivery.connections import Connections
from backupmx.delivery.outcomes import plan
from backupmx.delivery.relay import TransactionResult
from backupmx.delivery.retention import RetentionPolicy
from backupmx.delivery.statistics import Totals
from backupmx.delivery.work import Job, Window
from backupmx.model import (
    Bounced,
    Deferred,
    Delivered,
    Envelope,
    MessageRecord,
    QueueId,
    Recipient,
    RecipientRecord,
    RecipientState,
)
from backupmx.reply import Reply
from backupmx.spool import Claim
from tests.unit.delivery.harness import T0, make_config

CFG = make_config("127.0.0.1:1")
OK = Reply(250, "2.0.0", "Ok")


def message(n: int, *, received_at: float = T0, notify: tuple[str, ...] | None = None) -> MessageRecord:
    qid = QueueId("0000000000000A")
    rcpts = tuple(
        RecipientRecord(qid, i, f"r{i}@example.com", "example.com", RecipientState.QUEUED, notify=notify)
        for i in range(n)
    )
    env = Envelope("bob@sender.test", tuple(Recipient(r.address, notify) for r in rcpts))
    return MessageRecord(qid, env, 10, received_at, rcpts)


def result(*outcomes: Delivered | Deferred | Bounced, dsn_offered: bool = True) -> TransactionResult:
    return TransactionResult(outcomes, "127.0.0.1:25", "primary.test", dsn_offered, final_reply=OK)


def run_plan(
    msg: MessageRecord,
    res: TransactionResult,
    *,
    now: float = T0 + 10,
    guard: bool = False,
    retention: RetentionPolicy | None = None,
    delay_due: bool = False,
):  # type: ignore[no-untyped-def]
    return plan(
        msg,
        msg.recipients,
        res,
        now=now,
        guard=guard,
        delay_due=delay_due,
        outages=[],
        retention=retention or RetentionPolicy(timedelta(days=30), timedelta(days=90)),
        config=CFG,
        rng=Random(1),
    )


def test_plan_gives_each_recipient_exactly_one_update() -> None:
    msg = message(3)
    bounce = Bounced(Reply(550, "5.1.1", "unknown"))
    p = run_plan(msg, result(Delivered(OK), bounce, Deferred(Reply(451, "4.3.0", "later"))))
    assert [u.index for u in p.updates] == [0, 1, 2]
    assert [e for e, *_ in p.events] == ["delivered", "bounced", "deferred"]
    assert len(p.failed) == 1 and p.failed[0].record.index == 1
    assert p.updates[2].next_attempt_at > T0 + 10


def test_plan_holds_a_bounce_under_the_recovery_guard() -> None:
    p = run_plan(message(1), result(Bounced(Reply(550, "5.1.1", "unknown"))), guard=True)
    assert p.events[0][0] == "held" and p.failed == []
    assert isinstance(p.updates[0].outcome, Deferred) and p.updates[0].outcome.guard_hold


def test_plan_expires_at_the_end_of_retention_and_owes_a_dsn() -> None:
    short = RetentionPolicy(timedelta(seconds=5), timedelta(days=1))
    p = run_plan(message(1), result(Deferred(Reply(451, "4.3.0", "later"))), retention=short)
    assert p.updates[0].expire and p.events[0][0] == "expired" and len(p.failed) == 1


def test_plan_owes_a_relayed_dsn_when_the_primary_offers_no_dsn() -> None:
    msg = message(1, notify=("SUCCESS",))
    assert len(run_plan(msg, result(Delivered(OK), dsn_offered=False)).relayed) == 1
    assert run_plan(msg, result(Delivered(OK), dsn_offered=True)).relayed == []


def test_window_counts_forgets_and_drops() -> None:
    w = Window(10, 2)
    msg = message(3)
    jobs = [Job(Claim(msg, msg.recipients[i : i + 1], "n", T0 + 60), "example.com") for i in range(3)]
    for j in jobs:
        w.add(j)
    assert w.claimed == 3 and w.dest("example.com").queued == 3
    w.forget(jobs[0])
    assert w.claimed == 2 and w.dest("example.com").queued == 2
    dropped = w.drop_queue(w.dest("example.com"))
    assert dropped == jobs[1:] and w.claimed == 0 and not w.dest("example.com").queue


def test_slow_start_grows_on_success_and_halves_on_421() -> None:
    w = Window(10, 2)
    c = Connections(w, CFG.delivery, lambda coro: bool(coro.close()))
    dest = w.dest("example.com")
    c.feedback(dest, result(Delivered(OK)))
    assert dest.cwnd == 2.5
    c.feedback(dest, result(Deferred(Reply(421, "4.3.2", "busy"))))
    assert dest.cwnd == 1.25
    c.restart(dest)
    assert dest.cwnd == 2.0


def test_statistics_snapshot() -> None:
    w = Window(10, 2)
    t = Totals()
    t.count(w.dest("example.com"), "delivered")
    snap = t.snapshot(w, {})
    assert snap.delivered == 1 and snap.destinations["example.com"].delivered == 1 and snap.window == 10


def test_window_prunes_idle_destinations_it_need_not_keep() -> None:
    w = Window(10, 2)
    msg = message(1)
    w.dest("example.com")
    w.dest("idle-sender.test")
    busy = w.dest("busy-sender.test")
    busy.connections = 1
    w.add(Job(Claim(msg, msg.recipients, "n", T0 + 60), "queued-sender.test"))
    w.prune({"example.com"})
    assert set(w.dests) == {"example.com", "busy-sender.test", "queued-sender.test"}


def test_delay_notices_remembered_are_bounded() -> None:
    from backupmx.delivery.notices import DELAY_SENT_MIN, Notices
    from backupmx.spool.sqlite import SqliteSpool

    n = Notices(CFG, SqliteSpool(Path("/nonexistent")))
    for i in range(DELAY_SENT_MIN + 5):
        n.delay_sent(MessageRecord(QueueId(f"{i:014d}"), message(1).envelope, 1, T0))
    assert len(n._delay_sent) == DELAY_SENT_MIN


def test_last_good_routes_are_bounded_but_keep_protected_domains() -> None:
    import asyncio

    from backupmx.delivery import route
    from backupmx.delivery.route import RouteResolver
    from tests.unit.delivery.test_delivery_route import FakeDns

    names = [f"s{i}.test" for i in range(60)]
    dns = FakeDns({n: [(10, f"mx.{n}")] for n in names}, {f"mx.{n}": ["192.0.2.1"] for n in names})
    r = RouteResolver(CFG, dns)

    async def run() -> None:
        await r.resolve("example.com")
        for n in names:
            await r.resolve(n)

    old = route.LAST_GOOD_MAX
    route.LAST_GOOD_MAX = 20
    try:
        asyncio.run(run())
    finally:
        route.LAST_GOOD_MAX = old
    assert r.last_good("example.com") is not None and r.last_good(names[-1]) is not None
    assert len(r._last_good) <= 21
