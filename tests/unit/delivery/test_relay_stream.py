"""The relay against the scripted primary: 8-bit and split replies read as valid UTF-8 (issue 12
item 1), bodies streamed and dot-stuffed across chunk boundaries, an unreadable body never gets its
final dot, the lease checked before MAIL and before the dot (item 5), SMTPUTF8 only where it is needed
(item 8)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupmx.delivery.relay import DotStuffer, RelaySession, RelaySettings, StoredBody, dot_stuff, reply_from
from backupmx.delivery.route import Target
from backupmx.model import Bounced, Deferred, Delivered, Envelope, QueueId, Recipient, RecipientRecord, RecipientState
from backupmx.reply import Reply, readable
from tests.support.scripted_primary import Answer, ScriptedPrimary

BODY = b"Subject: s\r\n\r\n.first\r\nmid\r\n..two\r\n.\r\nend\r\n"


def rcpts(*addrs: str) -> list[RecipientRecord]:
    return [
        RecipientRecord(QueueId("Q"), i, a, a.rpartition("@")[2], RecipientState.QUEUED) for i, a in enumerate(addrs)
    ]


def env(rs: list[RecipientRecord], sender: str = "bob@sender.test", **kw: object) -> Envelope:
    return Envelope(sender=sender, recipients=tuple(Recipient(r.address) for r in rs), **kw)  # type: ignore[arg-type]


async def session(p: ScriptedPrimary) -> RelaySession:
    s = RelaySettings(local_hostname="backup.test", connect_timeout=2.0, command_timeout=2.0, data_timeout=3.0)
    return await RelaySession.open([Target("127.0.0.1", p.port, "127.0.0.1")], s)


def chunked(data: bytes, cuts: list[int]) -> StoredBody:
    async def gen() -> AsyncIterator[bytes]:
        last = 0
        for c in [*sorted(cuts), len(data)]:
            yield data[last:c]
            last = c

    return StoredBody(len(data), gen)


@pytest.fixture
async def primary() -> AsyncIterator[ScriptedPrimary]:
    p = await ScriptedPrimary().start()
    yield p
    await p.stop()


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"\r\n.", b".."]), max_size=30).map(b"".join),
    cuts=st.lists(st.integers(0, 60), max_size=6),
)
def test_stuffing_in_chunks_equals_stuffing_whole(data: bytes, cuts: list[int]) -> None:
    s = DotStuffer()
    last, out = 0, b""
    for c in [*sorted(min(c, len(data)) for c in cuts), len(data)]:
        out += s.feed(data[last:c])
        last = c
    assert out + s.end() == dot_stuff(data) == _reference_stuff(data)


def _reference_stuff(body: bytes) -> bytes:
    lines = body.split(b"\r\n")
    out = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)
    return out + (b".\r\n" if out.endswith(b"\r\n") or not out else b"\r\n.\r\n")


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"Ok: Nachricht f\xfcr M\xfcller", "Ok: Nachricht für Müller"),
        ("Ok: f\u00fcr".encode(), "Ok: für"),  # UTF-8 stays UTF-8
        (b"a\x00b\x1bc\rd", "a?b?c?d"),
    ],
)
def test_readable(raw: bytes, text: str) -> None:
    assert readable(raw) == text
    assert readable(raw.decode("utf-8", "surrogateescape")) == text  # what aiosmtplib hands over
    assert reply_from(250, "2.0.0 " + raw.decode("utf-8", "surrogateescape")).text.encode("utf-8")


@pytest.mark.parametrize("stage", ["DOT", "RCPT"])
async def test_8bit_split_replies_are_recorded_as_utf8(primary: ScriptedPrimary, stage: str) -> None:
    code, status = (b"250", b"2.0.0") if stage == "DOT" else (b"550", b"5.1.1")
    primary.script(
        stage,
        Answer.of(
            code + b"-" + status + b" Nachricht f\xfc",
            b"r M\xfcller\r\n" + code + b" " + status + b" zweite \xe4\r\n",
            delay=0.05,
        ),
    )
    s = await session(primary)
    rs = rcpts("a@example.test")
    res = await s.deliver(env(rs), rs, BODY)
    await s.quit()
    out = res.outcomes[0]
    assert isinstance(out, Delivered if stage == "DOT" else Bounced)
    assert out.reply.text == f"Nachricht für Müller\n{status.decode()} zweite ä"
    assert str(out.reply).encode("utf-8")  # storable: no surrogates


async def test_streamed_body_byte_exact_across_chunk_cuts(primary: ScriptedPrimary) -> None:
    s = await session(primary)
    rs = rcpts("a@example.test")
    # cuts inside "\r\n." sequences: after the CR, after the LF
    res = await s.deliver(env(rs), rs, chunked(BODY, [13, 14, 15, 21, 22, 26, 27]))
    await s.quit()
    assert isinstance(res.outcomes[0], Delivered)
    assert primary.bodies() == [BODY]


async def test_unreadable_body_never_gets_the_dot(primary: ScriptedPrimary) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"Subject: s\r\n\r\nfirst part\r\n"
        raise RuntimeError("checksum mismatch")

    s = await session(primary)
    rs = rcpts("a@example.test")
    res = await s.deliver(env(rs), rs, StoredBody(100, broken))
    assert isinstance(res.outcomes[0], Deferred) and "unreadable" in res.outcomes[0].reply.text
    await primary.until(lambda p: p.sessions == 1 and not s.usable, 2)
    assert primary.bodies() == []  # no final dot: nothing delivered


@pytest.mark.parametrize("lose_at", ["mail", "dot", "raise"])
async def test_lease_check(primary: ScriptedPrimary, lose_at: str) -> None:
    asked: list[str] = []

    async def check(stage: str) -> bool:
        asked.append(stage)
        if lose_at == "raise" and stage == "dot":
            raise ConnectionError("database gone")
        return stage != lose_at

    s = await session(primary)
    rs = rcpts("a@example.test", "b@example.test")
    res = await s.deliver(env(rs), rs, BODY, lease_check=check)
    assert res.lease_lost
    assert all(isinstance(o, Deferred) for o in res.outcomes)
    assert primary.bodies() == []
    if lose_at == "mail":
        assert asked == ["mail"] and s.usable  # nothing sent: the session serves the next message
        assert not any(c.startswith(b"MAIL") for c in primary.commands)
        again = await s.deliver(env(rs), rs, BODY, lease_check=check)
        assert again.lease_lost
        await s.quit()
    else:
        assert asked == ["mail", "dot"] and not s.usable


async def test_lease_kept_delivers(primary: ScriptedPrimary) -> None:
    asked: list[str] = []

    async def check(stage: str) -> bool:
        asked.append(stage)
        return True

    s = await session(primary)
    rs = rcpts("a@example.test")
    res = await s.deliver(env(rs), rs, BODY, lease_check=check)
    await s.quit()
    assert not res.lease_lost and isinstance(res.outcomes[0], Delivered)
    assert asked == ["mail", "dot"] and primary.copies("a@example.test") == 1


@pytest.mark.parametrize(
    ("sender", "rcpt", "head", "bounced"),
    [
        ("bob@sender.test", "a@example.test", b"Subject: plain\r\n", False),
        ("bob@sender.test", "a@example.test", b"Subject: plain\r\n\r\nK\xc3\xb6rper 8-bit\r\n", False),
        ("b\u00f6b@sender.test", "a@example.test", b"Subject: plain\r\n", True),
        ("bob@sender.test", "\u00e4@example.test", b"Subject: plain\r\n", True),
        ("bob@sender.test", "a@example.test", "Subject: gr\u00fc\u00dfe\r\n".encode(), True),
    ],
)
async def test_smtputf8_only_where_needed(
    primary: ScriptedPrimary, sender: str, rcpt: str, head: bytes, bounced: bool
) -> None:
    body = head if b"\r\n\r\n" in head else head + b"\r\nbody\r\n"
    s = await session(primary)  # no SMTPUTF8 in its EHLO
    rs = rcpts(rcpt)
    res = await s.deliver(env(rs, sender=sender, smtputf8=True), rs, chunked(body, [3, 9]))
    await s.quit()
    if bounced:
        assert res.outcomes[0] == Bounced(
            Reply(554, "5.6.7", f"SMTPUTF8 is required, but was not offered by host 127.0.0.1:{primary.port}")
        )
        assert primary.transactions == []
    else:
        assert isinstance(res.outcomes[0], Delivered)
        assert primary.bodies() == [body]
        assert b"SMTPUTF8" not in primary.transactions[0].mail  # plain SMTP (RFC 6531 §3.2)


async def test_unreadable_body_in_the_smtputf8_check_defers(primary: ScriptedPrimary) -> None:
    async def broken() -> AsyncIterator[bytes]:
        raise RuntimeError("gone")
        yield b""  # an async generator

    s = await session(primary)
    rs = rcpts("a@example.test")
    res = await s.deliver(env(rs, smtputf8=True), rs, StoredBody(10, broken))
    await s.quit()
    assert isinstance(res.outcomes[0], Deferred) and "unreadable" in res.outcomes[0].reply.text
    assert primary.transactions == []


async def test_a_reply_that_never_ends_is_a_timeout_not_a_hang(primary: ScriptedPrimary) -> None:
    primary.script("DOT", Answer.of(b"250-2.0.0 Ok, and then", hang=True))
    s = await RelaySession.open(
        [Target("127.0.0.1", primary.port, "127.0.0.1")],
        RelaySettings(local_hostname="backup.test", connect_timeout=2.0, command_timeout=2.0, data_timeout=0.5),
    )
    rs = rcpts("a@example.test")
    res = await s.deliver(env(rs), rs, BODY)
    assert res.timed_out and isinstance(res.outcomes[0], Deferred) and not s.usable
