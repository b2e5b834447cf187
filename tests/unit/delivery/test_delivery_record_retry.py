"""The engine when `spool.record` meets an unavailable database (PostgreSQL restarting, SQLite busy past
its timeout): the same outcomes and DSNs are recorded once the database is back, while the lease is ours;
a first try that committed although its caller saw an error is never written twice; no duplicate
delivery, no duplicate DSN. The fault is injected at the spool's boundary: a real SqliteSpool whose
`record` raises SpoolUnavailable the first N times."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from backupmx.delivery.outcomes import Recorded, _not_recorded
from backupmx.errors import SpoolFullError, SpoolUnavailable
from backupmx.model import QueueId, RecipientState
from backupmx.spool import NewMessage, RecipientUpdate
from tests.unit.delivery.fake_primary import Primary
from tests.unit.delivery.harness import Harness, make_config


class FlakyRecord:
    """Wraps the harness spool's `record`: the first `failures` calls raise SpoolUnavailable, before
    writing (`committed=False`) or after the commit, its reply lost (`committed=True`)."""

    def __init__(self, h: Harness, failures: int, *, committed: bool = False) -> None:
        self.real = h.spool.record
        self.failures = failures
        self.committed = committed
        self.calls = 0
        self.commits = 0
        h.spool.record = self  # type: ignore[method-assign]

    async def __call__(
        self, owner: str, updates: Sequence[RecipientUpdate], new_messages: Sequence[NewMessage] = (), *, now: float
    ) -> list[QueueId]:
        self.calls += 1
        if self.calls <= self.failures:
            if self.committed:
                await self.real(owner, updates, new_messages, now=now)
                self.commits += 1
            raise SpoolUnavailable("spool unavailable: database is starting up (injected)")
        ids = await self.real(owner, updates, new_messages, now=now)
        self.commits += 1
        return ids


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


async def harness(tmp_path: Path, primary: Primary, sink: Primary, lease: str = "60s") -> Harness:
    h = await Harness(tmp_path, make_config(primary.hostport, delivery={"lease": lease})).open()
    h.engine.set_reroute("sender.test", [("127.0.0.1", sink.port)])
    return h


def refuse_b(address: str) -> str | None:
    return "550 5.1.1 <b@example.com>: User unknown" if address == "b@example.com" else None


async def test_recorded_once_when_the_database_comes_back(tmp_path: Path, primary: Primary, sink: Primary) -> None:
    primary.rcpt_rule = refuse_b
    h = await harness(tmp_path, primary, sink)
    flaky = FlakyRecord(h, 3)
    qid = await h.put("a@example.com", "b@example.com")
    await h.engine.run_once()
    # three refusals of the first step (a@'s 250 alone), then it commits; the bounce of b@ and its DSN
    # in a second commit; the DSN's own delivery is recorded with a sixth call
    assert flaky.calls == 6 and flaky.commits == 3
    assert [r.state for r in (await h.get(qid)).recipients] == [RecipientState.DELIVERED, RecipientState.BOUNCED]
    assert [r.attempts for r in (await h.get(qid)).recipients] == [1, 1]
    assert len(await h.dsns()) == 1 and len(sink.received) == 1
    assert len(h.events.named("delivered")) == 2 and len(h.events.named("bounced")) == 1  # a@, and the DSN
    # the lease runs out: nothing comes back, nothing is delivered again
    h.fake.advance(3600)
    assert await h.engine.run_once() == 0
    assert primary.deliveries() == [("a@example.com", primary.received[0].content)]
    assert len(await h.dsns()) == 1 and len(sink.received) == 1
    await h.close()


async def test_a_lost_reply_of_a_committed_record_is_not_written_again(
    tmp_path: Path, primary: Primary, sink: Primary
) -> None:
    primary.rcpt_rule = refuse_b
    h = await harness(tmp_path, primary, sink)
    flaky = FlakyRecord(h, 1, committed=True)
    qid = await h.put("a@example.com", "b@example.com")
    await h.engine.run_once()
    # the first call (a@'s 250) committed and raised: the retry reads the recipient back, sees the
    # outcome, and writes nothing; then the bounce with its DSN, then the DSN's own delivery
    assert flaky.calls == 3 and flaky.commits == 3
    rec = await h.get(qid)
    assert [r.state for r in rec.recipients] == [RecipientState.DELIVERED, RecipientState.BOUNCED]
    assert [r.attempts for r in rec.recipients] == [1, 1]
    assert len(await h.dsns()) == 1 and len(sink.received) == 1  # one DSN queued, one sent
    assert len(h.events.named("bounced")) == 1
    h.fake.advance(3600)
    assert await h.engine.run_once() == 0
    assert len(primary.received) == 1 and len(sink.received) == 1
    await h.close()


async def test_gives_up_before_the_lease_runs_out(tmp_path: Path, primary: Primary, sink: Primary) -> None:
    h = await harness(tmp_path, primary, sink, lease="3s")
    flaky = FlakyRecord(h, 1_000)
    qid = await h.put("a@example.com")
    started = time.monotonic()
    assert await h.engine.run_once() == 0
    took = time.monotonic() - started
    assert 1.5 < took < 3.0  # tried again until shortly before the lease's end (margin 0.6 s), not after
    assert 3 <= flaky.calls <= 6 and flaky.commits == 0
    rcpt = await h.rcpt(qid)
    assert rcpt.state is RecipientState.QUEUED and rcpt.attempts == 0
    # the database is back, the lease runs out: delivered again (the outcome was never recorded)
    flaky.failures = 0
    h.fake.advance(10)
    assert await h.engine.run_once() == 1
    assert (await h.rcpt(qid)).state is RecipientState.DELIVERED and len(primary.received) == 2
    await h.close()


@pytest.mark.parametrize(
    ("error", "recorded"),
    [
        (SpoolFullError("disk full (injected)"), Recorded.LEFT),  # the lease runs out, the recipients come back
        (RuntimeError("a bug (injected)"), Recorded.FAILED),  # counted toward the poison limit
    ],
)
def test_an_error_no_retry_cures(error: Exception, recorded: Recorded, caplog: pytest.LogCaptureFixture) -> None:
    """What write() answers (on the first try and on a retry alike) for an error it does not try again."""
    try:
        raise error
    except Exception as e:
        assert _not_recorded(QueueId("Q1"), e) is recorded
    assert caplog.records[-1].getMessage() == "Q1: recording outcomes failed; the lease will run out and they come back"
    assert caplog.records[-1].exc_info is not None and caplog.records[-1].exc_info[1] is error
