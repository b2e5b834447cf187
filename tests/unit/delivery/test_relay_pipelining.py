"""Pipelining to the primary (RFC 2920, issue 14) against the scripted primary: MAIL, RCPT and DATA in
one write, the replies read in order whether they come in one packet, split or 8-bit; per-recipient
outcomes; RSET (or a lone dot) when no recipient was accepted and no body then; a 421 anywhere ends the
session; a reply that never ends is a timeout."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiosmtplib.email import quote_address

from backupmx.delivery.relay import RelaySession, RelaySettings, _path
from backupmx.delivery.route import Target
from backupmx.model import Bounced, Deferred, Delivered, Envelope, QueueId, Recipient, RecipientRecord, RecipientState
from tests.support.scripted_primary import Answer, ScriptedPrimary

BODY = b"Subject: s\r\n\r\n.first\r\nmid\r\n"


def rcpts(*addrs: str, notify: tuple[str, ...] | None = None, orcpt: str | None = None) -> list[RecipientRecord]:
    return [
        RecipientRecord(QueueId("Q"), i, a, a.rpartition("@")[2], RecipientState.QUEUED, notify=notify, orcpt=orcpt)
        for i, a in enumerate(addrs)
    ]


def env(rs: list[RecipientRecord]) -> Envelope:
    return Envelope(sender="bob@sender.test", recipients=tuple(Recipient(r.address, r.notify, r.orcpt) for r in rs))


async def session(p: ScriptedPrimary, command_timeout: float = 2.0) -> RelaySession:
    s = RelaySettings(
        local_hostname="backup.test", connect_timeout=2.0, command_timeout=command_timeout, data_timeout=3.0
    )
    return await RelaySession.open([Target("127.0.0.1", p.port, "127.0.0.1")], s)


@pytest.fixture
async def primary() -> AsyncIterator[ScriptedPrimary]:
    # grouped: the replies to MAIL and RCPT are held until DATA arrives, then sent in one write; a
    # client that waited for each reply (no pipelining) would time out here
    p = await ScriptedPrimary(grouped=True).start()
    yield p
    await p.stop()


def group_lines(p: ScriptedPrimary) -> list[bytes]:
    return [c.split(b" ", 1)[0].rstrip(b"\r\n").upper() for c in p.commands]


async def test_group_in_one_write_replies_in_one_packet(primary: ScriptedPrimary) -> None:
    s = await session(primary)
    rs = rcpts("a@example.test", "b@example.test", "c@example.test")
    res = await s.deliver(env(rs), rs, BODY)
    assert all(isinstance(o, Delivered) for o in res.outcomes), res.outcomes
    assert primary.bodies() == [BODY] and primary.copies("b@example.test") == 1
    assert group_lines(primary)[-5:] == [b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA"]
    res = await s.deliver(env(rs), rs, BODY)  # the session stays in step for the next transaction
    assert all(isinstance(o, Delivered) for o in res.outcomes) and len(primary.bodies()) == 2
    await s.quit()


async def test_one_refused_in_8bit_the_others_delivered(primary: ScriptedPrimary) -> None:
    primary.script("RCPT", "250 2.1.5 Ok\r\n", b"550 5.1.1 Benutzer unbekannt: M\xfcller\r\n")
    s = await session(primary)
    rs = rcpts("a@example.test", "m@example.test", "c@example.test")
    res = await s.deliver(env(rs), rs, BODY)
    a, m, c = res.outcomes
    assert isinstance(a, Delivered) and isinstance(c, Delivered)
    assert isinstance(m, Bounced) and m.reply.code == 550 and m.reply.text == "Benutzer unbekannt: Müller"
    assert [t.recipients for t in primary.delivered()] == [["a@example.test", "c@example.test"]]


async def test_replies_split_across_packets(primary: ScriptedPrimary) -> None:
    # a multi-line reply cut inside a line, in the middle of the group, then the rest held with DATA's
    primary.script("RCPT", Answer.of(b"250-2.1.5 first\r\n250 2.1", b".5 Ok\r\n", delay=0.05))
    primary.script("DATA", Answer.of(b"354 go", b" ahead\r\n", delay=0.05))
    s = await session(primary)
    rs = rcpts("a@example.test", "b@example.test")
    res = await s.deliver(env(rs), rs, BODY)
    assert all(isinstance(o, Delivered) for o in res.outcomes), res.outcomes
    assert primary.copies("a@example.test") == primary.copies("b@example.test") == 1


async def test_all_refused_rset_and_no_body(primary: ScriptedPrimary) -> None:
    primary.script("RCPT", "550 5.1.1 no\r\n", "450 4.2.0 later\r\n")
    primary.script("DATA", "554 5.5.1 Error: no valid recipients\r\n")
    s = await session(primary)
    rs = rcpts("a@example.test", "b@example.test")
    res = await s.deliver(env(rs), rs, BODY)
    assert isinstance(res.outcomes[0], Bounced) and isinstance(res.outcomes[1], Deferred)
    assert res.outcomes[1].reply.code == 450 and primary.bodies() == []
    assert group_lines(primary)[-1] == b"RSET" and s.usable
    res = await s.deliver(env(rs), rs, BODY)  # still in step
    assert all(isinstance(o, Delivered) for o in res.outcomes)


async def test_all_refused_yet_354_gets_a_lone_dot(primary: ScriptedPrimary) -> None:
    # RFC 2920 §3.1: the DATA reply must be checked; a 354 is answered with an empty message
    primary.script("RCPT", "550 5.1.1 no\r\n")
    s = await session(primary)
    rs = rcpts("a@example.test")
    res = await s.deliver(env(rs), rs, BODY)
    assert isinstance(res.outcomes[0], Bounced) and primary.bodies() == [b""] and primary.copies("a@example.test") == 0
    assert s.usable and (await s.deliver(env(rs), rs, BODY)).outcomes[0].reply.code == 250


async def test_refused_mail_decides_for_all(primary: ScriptedPrimary) -> None:
    primary.script("MAIL", "550 5.7.1 sender blocked\r\n")
    primary.script("RCPT", "503 5.5.1 need MAIL\r\n", "503 5.5.1 need MAIL\r\n")
    primary.script("DATA", "503 5.5.1 need RCPT\r\n")
    s = await session(primary)
    rs = rcpts("a@example.test", "b@example.test")
    res = await s.deliver(env(rs), rs, BODY)
    assert [(type(o), o.reply.code, o.reply.text) for o in res.outcomes] == [(Bounced, 550, "sender blocked")] * 2
    assert primary.bodies() == [] and s.usable


@pytest.mark.parametrize("verb", ["MAIL", "RCPT", "DATA"])
async def test_421_anywhere_ends_the_session(primary: ScriptedPrimary, verb: str) -> None:
    if verb == "RCPT":
        primary.script("RCPT", "250 2.1.5 Ok\r\n")  # the first accepted, the second gets the 421
    primary.script(verb, Answer.of("421 4.3.2 shutting down\r\n", close=True))
    s = await session(primary)
    rs = rcpts("a@example.test", "b@example.test")
    res = await s.deliver(env(rs), rs, BODY)
    assert all(isinstance(o, Deferred) and o.reply.code == 421 for o in res.outcomes), res.outcomes
    assert not s.usable and primary.bodies() == []


async def test_a_reply_in_the_group_that_never_ends_is_a_timeout(primary: ScriptedPrimary) -> None:
    primary.script("RCPT", Answer.of(b"250-2.1.5 and then", hang=True))
    s = await session(primary, command_timeout=0.5)
    rs = rcpts("a@example.test")
    res = await s.deliver(env(rs), rs, BODY)
    assert res.timed_out and isinstance(res.outcomes[0], Deferred) and not s.usable
    assert primary.bodies() == []


async def test_dsn_parameters_ride_in_the_group() -> None:
    p = await ScriptedPrimary(grouped=True, extensions=("PIPELINING", "DSN", "SIZE 1000000")).start()
    try:
        s = await session(p)
        rs = rcpts("a@example.test", notify=("SUCCESS", "DELAY"), orcpt="rfc822;orig@example.test")
        res = await s.deliver(env(rs), rs, BODY)
        assert isinstance(res.outcomes[0], Delivered) and res.dsn_offered
        assert b"RCPT TO:<a@example.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;orig@example.test\r\n" in p.commands
    finally:
        await p.stop()


@pytest.mark.parametrize(
    "address",
    [
        "",
        "a@example.test",
        "Ünïcode@bücher.test",
        "first.last+tag@sub.example.test",
        '"quoted local"@example.test',
        "a@[127.0.0.1]",
        "odd(comment)@example.test",
    ],
)
def test_path_as_aiosmtplib_writes_it(address: str) -> None:
    assert _path(address) == quote_address(address)


@pytest.mark.parametrize(
    "verb, answer",
    [("RCPT", b"garbage, not a reply\r\n"), ("DATA", b"354 go ahead\r\n250 2.0.0 and an extra reply\r\n")],
)
async def test_out_of_step_ends_the_connection(primary: ScriptedPrimary, verb: str, answer: bytes) -> None:
    # a reply that is not one, or one nobody asked for: no RSET on a session out of step (a 354 still
    # due would make the next commands a body), a deferral, and the connection closed at once (before,
    # an RSET was sent into the body and its reply waited for until command_timeout)
    primary.script(verb, answer)
    s = await session(primary)
    rs = rcpts("a@example.test")
    res = await s.deliver(env(rs), rs, BODY)
    assert isinstance(res.outcomes[0], Deferred) and not s.usable
    assert primary.bodies() == [] and b"RSET\r\n" not in primary.commands
