"""Issue 12, engine side, against a real SqliteSpool and loopback primaries with a FakeClock: one failing
job does not strand the others (item 4), a message whose processing keeps raising is set aside as
poison (held, never retried endlessly, never dropped), the DOWN sweep advances through the whole queue
and a failed commit does not silence a delay notice (item 6).

An "unexpected error" is injected where a real one was found (issue 12 items 1-2: building a DSN from an
odd envelope raised): `build_dsn` raises for one chosen message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

import backupmx.delivery.notices as notices
from backupmx.delivery import sweep
from backupmx.errors import SpoolUnavailable
from backupmx.model import MessageRecord, QueueId, Recipient, RecipientState
from backupmx.spool import NewMessage, RecipientUpdate
from tests.unit.delivery.fake_primary import Primary, closed_port
from tests.unit.delivery.harness import Harness, make_config


@pytest.fixture
async def sink() -> AsyncIterator[Primary]:
    p = await Primary(hostname="sender-mx.test").start()
    yield p
    await p.stop()


def poison_dsns_of(monkeypatch: pytest.MonkeyPatch, bad: set[QueueId]) -> list[QueueId]:
    """build_dsn raises for the messages in `bad` (filled in later); returns the list of calls."""
    real = notices.build_dsn
    calls: list[QueueId] = []

    def build(msg: MessageRecord, *a: object, **kw: object) -> NewMessage:
        calls.append(msg.id)
        if msg.id in bad:
            raise ValueError("header value contains a line break (injected)")
        return real(msg, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(notices, "build_dsn", build)
    return calls


async def refused(tmp_path: Path, sink: Primary, **delivery: object) -> Harness:
    d = {"delay_warning": "1m", "down_after": 100, "concurrency_initial": 1, **delivery}
    h = await Harness(tmp_path, make_config(f"127.0.0.1:{closed_port()}", delivery=d)).open()
    h.engine.set_reroute("sender.test", [("127.0.0.1", sink.port)])
    return h


async def test_one_failing_job_does_not_strand_the_others(
    tmp_path: Path, sink: Primary, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad: set[QueueId] = set()
    poison_dsns_of(monkeypatch, bad)
    h = await refused(tmp_path, sink)
    ids = [await h.put("a@example.com") for _ in range(3)]
    bad.add(ids[1])
    h.fake.advance(120)  # a delay notice is due with the deferral: the DSN for ids[1] raises
    # before: the jobs after the failing one stayed in the window, leases renewed, and run_once waited
    # for them forever
    await asyncio.wait_for(h.engine.run_once(), 20)
    assert h.engine.statistics().claimed == 0
    for qid in (ids[0], ids[2]):
        r = await h.rcpt(qid)
        assert r.state is RecipientState.QUEUED and r.attempts == 1 and r.delay_notified
    assert (await h.rcpt(ids[1])).attempts == 0  # not recorded: left to its lease
    assert len(sink.received) == 2  # the two delay notices
    await h.close()


async def test_poison_message_is_held_after_n_failures_in_a_row(
    tmp_path: Path, sink: Primary, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad: set[QueueId] = set()
    calls = poison_dsns_of(monkeypatch, bad)
    h = await refused(tmp_path, sink, poison_after=3)
    good = await h.put("a@example.com")
    qid = await h.put("b@example.com", "c@example.com")
    bad.add(qid)
    for _ in range(5):
        h.fake.advance(120)  # past the lease (60 s): the message comes back
        await asyncio.wait_for(h.engine.run_once(), 20)
    assert calls.count(qid) == 3  # three tries, then never again
    rec = await h.get(qid)
    assert [(r.state, r.held_reason) for r in rec.recipients] == [(RecipientState.HELD, "poison")] * 2
    assert h.events.named("held")[-1]["reason"] == "poison"
    assert (await h.rcpt(good)).delay_notified  # the other message was not held up
    assert await h.spool.kv_get("poison", str(qid)) is None  # the count is cleared once set aside
    # released by the operator, and the error gone: delivered normally (not dropped)
    bad.clear()
    assert await h.spool.release_held(qid, now=h.clock.now()) == 2  # tried at once: no lease left over
    await asyncio.wait_for(h.engine.run_once(), 20)
    assert {r.state for r in (await h.get(qid)).recipients} == {RecipientState.QUEUED}
    assert all(r.attempts == 1 for r in (await h.get(qid)).recipients)
    await h.close()


async def test_failures_not_in_a_row_do_not_poison(
    tmp_path: Path, sink: Primary, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad: set[QueueId] = set()
    poison_dsns_of(monkeypatch, bad)
    h = await refused(tmp_path, sink, poison_after=2, delay_warning="30m")
    qid = await h.put("a@example.com")
    h.fake.advance(3600)
    bad.add(qid)
    await asyncio.wait_for(h.engine.run_once(), 20)  # failure 1 (the delay notice raises)
    assert await h.spool.kv_get("poison", str(qid)) == b"1"
    bad.clear()
    h.fake.advance(120)
    await asyncio.wait_for(h.engine.run_once(), 20)  # recorded: the count is cleared
    assert await h.spool.kv_get("poison", str(qid)) is None
    assert (await h.rcpt(qid)).state is RecipientState.QUEUED
    await h.close()


async def test_down_sweep_advances_past_recipients_it_leaves_alone(
    tmp_path: Path, sink: Primary, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweep, "SWEEP_BATCH", 4)
    monkeypatch.setattr(sweep, "SWEEP_BATCHES", 1)
    h = await refused(tmp_path, sink)
    await h.monitor.force_down("example.com", "test")
    never = [await h.put(Recipient("n@example.com", notify=("NEVER",))) for _ in range(4)]  # due first
    later = [await h.put("a@example.com") for _ in range(3)]
    h.fake.advance(120)
    for _ in range(3):
        await asyncio.wait_for(h.engine.run_once(), 20)
        h.fake.advance(61)
    # before: every sweep read the same four NOTIFY=NEVER recipients again, the later messages never
    # got their delay notice
    assert [(await h.rcpt(q)).delay_notified for q in later] == [True] * 3
    assert len(sink.received) == 3
    assert [(await h.rcpt(q)).attempts for q in never] == [0] * 4  # left alone: no attempt while DOWN
    await h.close()


async def test_a_failed_sweep_commit_does_not_silence_the_delay_notice(tmp_path: Path, sink: Primary) -> None:
    h = await refused(tmp_path, sink, lease="5s")
    await h.monitor.force_down("example.com", "test")
    qid = await h.put("a@example.com")
    real = h.spool.record
    failures = [1]

    async def record(
        owner: str, updates: Sequence[RecipientUpdate], new_messages: Sequence[NewMessage] = (), *, now: float
    ) -> list[QueueId]:
        if failures[0] > 0:
            failures[0] -= 1
            raise SpoolUnavailable("spool unavailable (injected)")
        return await real(owner, updates, new_messages, now=now)

    h.spool.record = record  # type: ignore[method-assign]
    h.fake.advance(120)
    await asyncio.wait_for(h.engine.run_once(), 20)
    assert not (await h.rcpt(qid)).delay_notified
    h.fake.advance(61)  # the lease runs out, the next sweep tries again
    await asyncio.wait_for(h.engine.run_once(), 20)
    assert (await h.rcpt(qid)).delay_notified and len(sink.received) == 1
    await h.close()


async def test_parallel_refused_connects_do_not_declare_an_outage(tmp_path: Path) -> None:
    """Issue 12 item 7: two workers refused at once (a primary restarting) are one observation."""
    h = await Harness(
        tmp_path,
        make_config(
            f"127.0.0.1:{closed_port()}", delivery={"down_after": 2, "concurrency_initial": 2, "probe_interval": "30s"}
        ),
    ).open()
    for _ in range(4):
        await h.put("a@example.com")
    await asyncio.wait_for(h.engine.run_once(), 20)
    assert h.monitor.is_deliverable("example.com")
    assert await h.spool.outages("example.com") == []
    assert h.monitor.status("example.com").consecutive_failures == 1
    h.fake.advance(31)  # a failure a probe interval later is a second observation: DOWN
    await h.monitor.report_delivery("example.com", ok=False, error="connection refused")
    assert not h.monitor.is_deliverable("example.com")
    await h.close()


async def test_held_for_review_or_as_poison_expires_at_the_cap(tmp_path: Path, sink: Primary) -> None:
    """Held is not forgotten: recovery-guard and poison holds follow retention_cap (a DSN at the cap, as
    for queued mail); an operator's hold is the operator's."""
    primary = await Primary().start()
    try:
        h = await Harness(
            tmp_path, make_config(primary.hostport, delivery={"retention": "1h", "retention_cap": "2h"})
        ).open()
        h.engine.set_reroute("sender.test", [("127.0.0.1", sink.port)])
        poison, guard, operator = (
            await h.put("a@example.com"),
            await h.put("b@example.com"),
            await h.put("c@example.com"),
        )
        await h.spool.hold(poison, reason="poison", now=h.clock.now())
        await h.spool.hold(guard, reason="recovery-guard", now=h.clock.now())
        await h.spool.hold(operator, now=h.clock.now())
        stats = {d.domain: d for d in (await h.spool.stats()).domains}["example.com"]
        assert stats.held_by_reason == {"poison": 1, "recovery-guard": 1, "operator": 1}
        h.fake.advance(3600)
        await asyncio.wait_for(h.engine.run_once(), 20)
        assert {(await h.rcpt(q)).state for q in (poison, guard, operator)} == {RecipientState.HELD}
        h.fake.advance(3601)  # past the cap
        await asyncio.wait_for(h.engine.run_once(), 20)
        assert (await h.rcpt(poison)).state is RecipientState.EXPIRED
        assert (await h.rcpt(guard)).state is RecipientState.EXPIRED
        assert (await h.rcpt(operator)).state is RecipientState.HELD
        assert len(sink.received) == 2 and primary.received == []  # two DSNs, nothing delivered
        assert {e["reason"] for e in h.events.named("expired")} == {"poison", "recovery-guard"}
        await h.close()
    finally:
        await primary.stop()


async def test_queue_list_shows_why_and_how_long_mail_is_held(tmp_path: Path) -> None:
    import json
    import time

    from backupmx.model import Envelope
    from backupmx.spool import BodyBuffer
    from backupmx.spool.sqlite import SqliteSpool
    from tests.support.serve import ServeProcess

    node = ServeProcess(tmp_path / "node", extra={"dns": {"nameservers": ["127.0.0.1:9"]}})
    spool = SqliteSpool(node.data_dir)
    await spool.open()
    qid = await spool.put(
        Envelope("bob@sender.test", (Recipient("a@example.test"),)),
        BodyBuffer.from_bytes(b"Subject: x\r\n\r\nx\r\n"),
        now=time.time() - 7200,
    )
    await spool.hold(qid, reason="poison", now=time.time() - 3700)
    await spool.close()
    listing = (await asyncio.to_thread(node.cli, "queue", "list")).stdout
    assert f"{qid}!" in listing and "(held by poison for 1h 1m)" in listing
    doc = json.loads((await asyncio.to_thread(node.cli, "queue", "list", "--json")).stdout)
    rcpt = doc["messages"][0]["recipients"][0]
    assert rcpt["held_reason"] == "poison" and rcpt["held_since"] is not None


@pytest.mark.parametrize("slow", ["EHLO", "RCPT"])
async def test_a_lease_taken_over_during_the_attempt_delivers_no_copy(tmp_path: Path, slow: str) -> None:
    """Issue 12 item 5: the lease is checked (and renewed) before MAIL FROM and before the final dot. While
    the primary is slow (EHLO: before MAIL; RCPT: before the dot) the lease runs out and another node
    claims the recipient: this node abandons the transaction, records nothing, and no copy arrives."""
    from tests.support.scripted_primary import Answer, ScriptedPrimary

    primary = await ScriptedPrimary().start()
    try:
        ehlo = "250-primary.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        primary.script(slow, Answer.of("250 2.1.5 Ok\r\n" if slow == "RCPT" else ehlo, delay=1.0))
        h = await Harness(tmp_path, make_config(primary.hostport)).open()
        qid = await h.put("a@example.com")
        run = asyncio.create_task(h.engine.run_once())
        await asyncio.sleep(0.4)  # the engine waits for the slow answer
        taken = await h.spool.claim_due(now=h.clock.now() + 61, owner="other", lease_seconds=60, limit=10)
        assert [c.message.id for c in taken] == [qid]
        await asyncio.wait_for(run, 20)
        assert primary.delivered() == [] and primary.bodies() == []  # before: delivered here and by "other"
        rcpt = await h.rcpt(qid)
        assert rcpt.state is RecipientState.QUEUED and rcpt.attempts == 0
        assert h.engine.statistics().claimed == 0
        await h.close()
    finally:
        await primary.stop()
