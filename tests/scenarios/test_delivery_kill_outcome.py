"""Issue 12 item 3 against a real `serve`: SIGKILL at every step of the outcome path of a message with
one recipient the primary takes (250) and one it refuses (550, a DSN owed to the sender). After the
restart: never a lost outcome (a@ delivered, b@ bounced, exactly one DSN at the sender's MX) and never
a second copy at the primary, except after a kill between the primary's 250 and our commit (the one
duplicate the promise allows).

Kill points: after the remote 250; after "delivered" is committed (before any DSN work); during the
commit of the bounce and its DSN (SQLite's group with a put, the second after the accept's). And the
poison limit, with an error raised (BACKUPMX_FAULT_ACTION=raise) where the DSN is about to be committed."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from backupmx.model import MessageKind, RecipientState
from backupmx.spool import QueueFilter
from backupmx.spool.sqlite import SqliteSpool
from tests.scenarios.test_01_serve_durability import make_body, send
from tests.support.ports import free_port
from tests.support.serve import ServeProcess
from tests.unit.delivery.fake_primary import Primary


async def _setup(
    tmp_path: Path,
    delivery: dict[str, object],
    *,
    env: dict[str, str] | None = None,
) -> tuple[Primary, Primary, ServeProcess]:
    """The primary (250 for a@, 550 for b@), the sender's MX that gets the DSN, and the (unstarted) node
    protecting both, with short retries and `delivery`'s own lease (and poison limit)."""
    primary = await Primary().start()
    primary.rcpt_rule = lambda a: "550 5.1.1 <b@example.test>: User unknown" if a.startswith("b@") else None
    sink = await Primary(hostname="mx.sender.test").start()
    node = ServeProcess(
        tmp_path / "node",
        domains=[
            {"name": "example.test", "primary": [primary.hostport], "recipients": "any"},
            {"name": "sender.test", "primary": [sink.hostport], "recipients": "any"},
        ],
        delivery={"retry_min": "1s", "retry_max": "2s", "probe_interval": "1s", **delivery},
        extra={"dns": {"nameservers": [f"127.0.0.1:{free_port()}"], "timeout": "1s"}},
        env=env,
    )
    return primary, sink, node


@pytest.mark.parametrize(
    ("point", "after", "copies"),
    [
        ("delivery.after_remote_250", "1", 2),
        ("delivery.after_delivered_commit", "1", 1),
        ("spool.before_commit", "2", 1),  # the 1st put group is the accept; the 2nd carries the DSN
    ],
)
async def test_kill_in_the_outcome_path(tmp_path: Path, point: str, after: str, copies: int) -> None:
    primary, sink, node = await _setup(tmp_path, {"lease": "2s"})
    try:
        await asyncio.to_thread(node.start, env={"BACKUPMX_FAULT": point, "BACKUPMX_FAULT_AFTER": after})
        await asyncio.to_thread(send, node.port, make_body(1, size=2000), ["a@example.test", "b@example.test"])
        assert node.proc is not None
        code = await asyncio.to_thread(node.proc.wait, 30)
        assert code == -signal.SIGKILL, f"not killed at {point}:\n{node.log()}"
        await asyncio.to_thread(node.start)
        deadline = time.monotonic() + 20
        while len(sink.received) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # a second DSN or copy would show by now (retry_min 1 s)
        assert await asyncio.to_thread(node.terminate) == 0
        spool = SqliteSpool(node.data_dir)
        await spool.open()
        try:
            msgs = await spool.list_messages(QueueFilter(pending_only=False), limit=10)
        finally:
            await spool.close()
        user = [m for m in msgs if m.kind is MessageKind.USER]
        assert len(user) == 1
        assert [r.state for r in user[0].recipients] == [RecipientState.DELIVERED, RecipientState.BOUNCED]
        assert len([m for m in msgs if m.kind is MessageKind.DSN]) == 1
        assert len(sink.received) == 1 and sink.received[0].mail_from == "<>"
        assert [r.rcpt_tos for r in primary.received] == [["a@example.test"]] * copies
    finally:
        node.kill()
        await primary.stop()
        await sink.stop()


async def test_poison_message_against_a_real_serve(tmp_path: Path) -> None:
    """A message whose DSN work raises every time (an unexpected error injected where the DSN is about to
    be committed): a@'s 250 was committed first, so the primary gets one copy; b@ is tried
    `poison_after` times, then held as poison, shown so by `queue list`, and never tried again."""
    primary, sink, node = await _setup(
        tmp_path,
        {"lease": "1s", "poison_after": 2},
        env={"BACKUPMX_FAULT": "delivery.before_dsn_commit", "BACKUPMX_FAULT_ACTION": "raise"},
    )
    try:
        await asyncio.to_thread(node.start)
        qid = await asyncio.to_thread(send, node.port, make_body(1, size=2000), ["a@example.test", "b@example.test"])
        deadline = time.monotonic() + 20
        listing = ""
        while "held by poison" not in listing and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            listing = (await asyncio.to_thread(node.cli, "queue", "list")).stdout
        assert f"{qid}!" in listing and "(held by poison for " in listing, listing
        rcpts = len(primary.received)
        await asyncio.sleep(2.5)  # past two leases: nothing is tried again
        assert len(primary.received) == rcpts
        assert [r.rcpt_tos for r in primary.received if r.content] == [["a@example.test"]]  # one copy
        assert sink.received == []  # the DSN never got built: b@ waits for the operator, not lost
        assert "backupmx/held: " in node.log() and "reason=poison" in node.log()  # the mail log (stderr)
    finally:
        node.kill()
        await primary.stop()
        await sink.stop()
