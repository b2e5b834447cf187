"""One pipelined delivery (RFC 2920, issue 14) to a real Postfix primary: it answers the group in one
write, refuses an unknown user at RCPT, and stores the others' copy byte-exact in their Maildirs."""

from __future__ import annotations

from collections.abc import Callable

from backupmx.delivery.relay import RelaySession, RelaySettings
from backupmx.delivery.route import Target
from backupmx.model import Bounced, Delivered, Envelope, QueueId, Recipient, RecipientRecord, RecipientState
from tests.support.fixtures import postfix_factory  # noqa: F401 (a fixture)
from tests.support.postfix import PostfixInstance

BODY = (
    b"From: s@sender.test\r\nDate: Sun, 6 Dec 2026 04:00:00 +0000\r\nSubject: pipelined\r\n"
    b"Message-ID: <pipe@sender.test>\r\n\r\n.dot first\r\nbody\r\n"
)


async def test_pipelined_delivery_to_postfix(postfix_factory: Callable[..., PostfixInstance]) -> None:  # noqa: F811
    pf = postfix_factory("primary", domain="example.test", users=("alice", "bob"))
    settings = RelaySettings(local_hostname="backup.test", connect_timeout=5.0, command_timeout=10.0, data_timeout=10.0)
    s = await RelaySession.open([Target("127.0.0.1", pf.port, "127.0.0.1")], settings)
    assert s.supports("pipelining")
    addrs = ["alice@example.test", "nobody-here@example.test", "bob@example.test"]
    rs = [RecipientRecord(QueueId("Q"), i, a, "example.test", RecipientState.QUEUED) for i, a in enumerate(addrs)]
    res = await s.deliver(Envelope(sender="s@sender.test", recipients=tuple(Recipient(a) for a in addrs)), rs, BODY)
    alice, unknown, bob = res.outcomes
    assert isinstance(alice, Delivered) and isinstance(bob, Delivered), res.outcomes
    assert isinstance(unknown, Bounced) and unknown.reply.code == 550 and unknown.reply.status == "5.1.1"
    assert s.usable
    await s.quit()
    for user in ("alice", "bob"):
        (got,) = pf.wait_for_messages(user, 1, timeout=15)
        assert got.replace(b"\n", b"\r\n").endswith(BODY)
