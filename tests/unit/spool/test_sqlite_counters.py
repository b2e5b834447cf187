"""The counters the SQLite spool keeps by trigger (pending per kind, recipients per domain and state,
pending messages per domain) against a full recount, after a long random mix of every write."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from backupmx.clock import FakeClock
from backupmx.errors import LeaseLost
from backupmx.model import Bounced, Deferred, Delivered, Envelope, MessageKind, QueueId, Recipient
from backupmx.reply import Reply
from backupmx.spool import BodyBuffer, Claim, NewMessage, RecipientUpdate
from backupmx.spool.sqlite import SqliteSpool
from tests.unit.spool.integrity import check_integrity

T0 = 1_700_000_000.0
DOMAINS = ["a.example", "b.example", "c.example"]


async def test_counters_match_a_recount_after_random_operations(tmp_path: Path) -> None:
    rng = random.Random(42)
    clock = FakeClock(T0)
    spool = SqliteSpool(tmp_path, clock=clock)
    await spool.open()
    ids: list[QueueId] = []
    claims: list[Claim] = []
    try:
        for step in range(600):
            clock.advance(rng.uniform(0, 20))
            now = clock.now()
            op = rng.random()
            if op < 0.3:
                n = rng.randint(1, 4)
                env = Envelope(
                    sender=rng.choice(["", "s@x.example"]),
                    recipients=tuple(Recipient(f"u{step}.{i}@{rng.choice(DOMAINS)}") for i in range(n)),
                    kind=rng.choice(list(MessageKind)),
                )
                puts = [
                    spool.put(env, BodyBuffer.from_bytes(b"x" * rng.randint(0, 100))) for _ in range(rng.randint(1, 3))
                ]
                ids += await asyncio.gather(*puts)
            elif op < 0.5:
                claims += await spool.claim_due(
                    now=now, owner=rng.choice(["n1", "n2"]), lease_seconds=30, limit=rng.randint(1, 6)
                )
            elif op < 0.7 and claims:
                claim = claims.pop(rng.randrange(len(claims)))
                updates = []
                new: list[NewMessage] = []
                for r in claim.recipients:
                    outcome = rng.choice(
                        [
                            Delivered(Reply(250, "2.0.0", "ok")),
                            Bounced(Reply(550, "5.1.1", "no")),
                            Deferred(Reply(451, "4.3.0", "later")),
                            Deferred(Reply(550, "5.1.1", "?"), guard_hold=True),
                            None,
                        ]
                    )
                    updates.append(
                        RecipientUpdate(
                            r.message_id, r.index, outcome, next_attempt_at=now + 30, expire=outcome is None
                        )
                    )
                    if isinstance(outcome, Bounced):
                        new.append(
                            NewMessage(
                                Envelope(sender="", recipients=(Recipient("s@x.example"),), kind=MessageKind.DSN),
                                b"dsn",
                            )
                        )
                try:
                    ids += await spool.record(claim.owner, updates, new, now=now)
                except LeaseLost:
                    pass
            elif op < 0.78 and ids:
                await spool.hold(
                    rng.choice([None, rng.choice(ids)]),
                    domain=rng.choice([None, *DOMAINS]),
                    reason=rng.choice(["operator", "drill"]),
                )
            elif op < 0.86 and ids:
                await spool.release_held(
                    rng.choice([None, rng.choice(ids)]),
                    domain=rng.choice([None, *DOMAINS]),
                    reason=rng.choice([None, "drill"]),
                )
            elif op < 0.92 and ids:
                await spool.delete(ids.pop(rng.randrange(len(ids))))
            elif op < 0.96:
                await spool.flush(rng.choice([None, *DOMAINS]))
            else:
                await spool.purge(before=now - rng.uniform(0, 200))
            if step % 100 == 99:
                assert check_integrity(tmp_path / "spool.db") == []
        st = await spool.stats()
        assert st.messages_pending == await spool.count_pending(include_kinds=[k.value for k in MessageKind])
    finally:
        await spool.close()
    assert check_integrity(tmp_path / "spool.db") == []
