"""The relay client against aiosmtpd primaries on loopback, with and without PIPELINING: per-recipient
outcomes, timeouts, dropped connections, DSN parameters, SMTPUTF8, dot-stuffing and byte-exact bodies."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from backupmx.delivery.relay import ConnectFailed, RelaySession, RelaySettings, dot_stuff, reply_from
from backupmx.delivery.route import Target
from backupmx.model import (
    Bounced,
    Deferred,
    Delivered,
    Envelope,
    QueueId,
    Recipient,
    RecipientRecord,
    RecipientState,
)
from backupmx.reply import Reply
from tests.unit.delivery.fake_primary import BlackHole, Greeter, Primary, closed_port, self_signed

BODY = (
    b"Received: from client.test\r\nSubject: dots\r\n\r\n.leading dot\r\n..two dots\r\n"
    b"middle . dot\r\n.\r\nlast line\r\n"
)


def settings(**kw: float) -> RelaySettings:
    base: dict[str, float] = {"connect_timeout": 2.0, "command_timeout": 2.0, "data_timeout": 5.0}
    base.update(kw)
    return RelaySettings(local_hostname="backup.test", **base)  # type: ignore[arg-type]


def rcpts(*addrs: str, notify: tuple[str, ...] | None = None, orcpt: str | None = None) -> list[RecipientRecord]:
    return [
        RecipientRecord(QueueId("Q"), i, a, a.rpartition("@")[2], RecipientState.QUEUED, notify=notify, orcpt=orcpt)
        for i, a in enumerate(addrs)
    ]


def env(rs: list[RecipientRecord], **kw: object) -> Envelope:
    return Envelope(
        sender=str(kw.pop("sender", "bob@sender.test")),
        recipients=tuple(Recipient(r.address, r.notify, r.orcpt) for r in rs),
        **kw,
    )  # type: ignore[arg-type]


def target(p: Primary | Greeter | BlackHole | int) -> Target:
    port = p if isinstance(p, int) else p.port
    return Target("127.0.0.1", port, "127.0.0.1")


@pytest.fixture(params=[False, True], ids=["one-by-one", "pipelined"])
async def primary(request: pytest.FixtureRequest) -> Primary:
    p = await Primary(pipelining=request.param).start()
    yield p  # type: ignore[misc]
    await p.stop()


def test_dot_stuffing() -> None:
    assert dot_stuff(b"a\r\n.b\r\n") == b"a\r\n..b\r\n.\r\n"
    assert dot_stuff(b".x\r\n") == b"..x\r\n.\r\n"
    assert dot_stuff(b"x\r\n.\r\n") == b"x\r\n..\r\n.\r\n"
    assert dot_stuff(b"no final crlf") == b"no final crlf\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (250, "2.0.0 Ok: queued", Reply(250, "2.0.0", "Ok: queued")),
        (550, "5.1.1 <a@b>: unknown\n5.1.1 more", Reply(550, "5.1.1", "<a@b>: unknown\n5.1.1 more")),
        (421, "closing", Reply(421, "", "closing")),
    ],
)
def test_reply_from(code: int, text: str, expected: Reply) -> None:
    assert reply_from(code, text) == expected


async def test_delivers_byte_exact_with_dots(primary: Primary) -> None:
    s = await RelaySession.open([target(primary)], settings())
    rs = rcpts("alice@example.com", "bob@example.com")
    result = await s.deliver(env(rs), rs, BODY)
    await s.quit()
    assert all(isinstance(o, Delivered) for o in result.outcomes)
    assert primary.contents() == [BODY]
    assert primary.received[0].rcpt_tos == ["alice@example.com", "bob@example.com"]


async def test_null_sender(primary: Primary) -> None:
    s = await RelaySession.open([target(primary)], settings())
    rs = rcpts("alice@example.com")
    result = await s.deliver(env(rs, sender=""), rs, BODY)
    assert isinstance(result.outcomes[0], Delivered)
    assert primary.received[0].mail_from == "<>"


async def test_one_of_three_refused(primary: Primary) -> None:
    primary.rcpt_rule = lambda a: "550 5.1.1 <b@example.com>: unknown user" if a.startswith("b@") else None
    s = await RelaySession.open([target(primary)], settings())
    rs = rcpts("a@example.com", "b@example.com", "c@example.com")
    result = await s.deliver(env(rs), rs, BODY)
    kinds = [type(o) for o in result.outcomes]
    assert kinds == [Delivered, Bounced, Delivered]
    assert result.outcomes[1].reply == Reply(550, "5.1.1", "<b@example.com>: unknown user")
    assert primary.received[0].rcpt_tos == ["a@example.com", "c@example.com"]


async def test_451_per_recipient_and_552_is_temporary(primary: Primary) -> None:
    primary.rcpt_rule = lambda a: {"b@example.com": "451 4.3.0 try later", "c@example.com": "552 5.5.3 too many"}.get(a)
    s = await RelaySession.open([target(primary)], settings())
    rs = rcpts("a@example.com", "b@example.com", "c@example.com")
    result = await s.deliver(env(rs), rs, BODY)
    assert [type(o) for o in result.outcomes] == [Delivered, Deferred, Deferred]


async def test_all_refused_no_data(primary: Primary) -> None:
    primary.rcpt_rule = lambda a: "550 5.1.1 nope"
    s = await RelaySession.open([target(primary)], settings())
    rs = rcpts("a@example.com", "b@example.com")
    result = await s.deliver(env(rs), rs, BODY)
    assert [type(o) for o in result.outcomes] == [Bounced, Bounced]
    assert primary.data_started == 0
    assert s.usable  # RSET, the session goes on
    rs2 = rcpts("ok@other.example")
    primary.rcpt_rule = None
    assert isinstance((await s.deliver(env(rs2), rs2, BODY)).outcomes[0], Delivered)


async def test_554_after_dot(primary: Primary) -> None:
    async def rule(_: object) -> str:
        return "554 5.7.1 rejected as spam"

    primary.data_rule = rule
    s = await RelaySession.open([target(primary)], settings())
    rs = rcpts("a@example.com", "b@example.com")
    result = await s.deliver(env(rs), rs, BODY)
    assert [type(o) for o in result.outcomes] == [Bounced, Bounced]
    assert result.final_reply == Reply(554, "5.7.1", "rejected as spam")


async def test_451_after_dot(primary: Primary) -> None:
    async def rule(_: object) -> str:
        return "451 4.3.0 queue full"

    primary.data_rule = rule
    s = await RelaySession.open([target(primary)], settings())
    rs = rcpts("a@example.com")
    result = await s.deliver(env(rs), rs, BODY)
    assert isinstance(result.outcomes[0], Deferred)


async def test_421_to_mail(primary: Primary) -> None:
    primary.mail_reply = "421 4.3.2 shutting down"
    s = await RelaySession.open([target(primary)], settings())
    rs = rcpts("a@example.com")
    result = await s.deliver(env(rs), rs, BODY)
    assert isinstance(result.outcomes[0], Deferred)
    assert result.outcomes[0].reply.code == 421
    assert not s.usable


async def test_drop_mid_data_defers_all(primary: Primary) -> None:
    primary.drop_in_data = True
    s = await RelaySession.open([target(primary)], settings())
    rs = rcpts("a@example.com", "b@example.com")
    result = await s.deliver(env(rs), rs, BODY)
    assert [type(o) for o in result.outcomes] == [Deferred, Deferred]
    assert result.timed_out and not s.usable


async def test_slow_final_reply_within_data_timeout(primary: Primary) -> None:
    """The primary takes 3 s to answer the dot; command_timeout is 1 s, data_timeout 10 s: one
    delivery, no timeout (aiosmtplib's single timeout would have given up after 1 s)."""
    primary.data_delay = 3.0
    s = await RelaySession.open([target(primary)], settings(command_timeout=1.0, data_timeout=10.0))
    rs = rcpts("a@example.com")
    t0 = time.monotonic()
    result = await s.deliver(env(rs), rs, BODY)
    assert isinstance(result.outcomes[0], Delivered)
    assert time.monotonic() - t0 >= 2.9
    assert len(primary.received) == 1


async def test_final_reply_timeout_defers(primary: Primary) -> None:
    primary.data_delay = 2.0
    s = await RelaySession.open([target(primary)], settings(command_timeout=1.0, data_timeout=0.5))
    rs = rcpts("a@example.com")
    result = await s.deliver(env(rs), rs, BODY)
    assert isinstance(result.outcomes[0], Deferred) and result.timed_out


async def test_dsn_parameters_passed_unchanged() -> None:
    p = await Primary(dsn=True).start()
    try:
        s = await RelaySession.open([target(p)], settings())
        rs = rcpts("a@example.com", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;Alice+2Bx@example.com")
        e = env(rs, ret="HDRS", envid="abc+2Bdef")
        result = await s.deliver(e, rs, BODY)
        assert result.dsn_offered and isinstance(result.outcomes[0], Delivered)
        got = p.received[0]
        assert got.dsn_mail == {"RET": "HDRS", "ENVID": "abc+2Bdef"}
        assert got.dsn_rcpt["a@example.com"] == {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;Alice+2Bx@example.com"}
    finally:
        await p.stop()


async def test_no_dsn_parameters_without_dsn(primary: Primary) -> None:
    s = await RelaySession.open([target(primary)], settings())
    rs = rcpts("a@example.com", notify=("NEVER",))
    result = await s.deliver(env(rs, ret="FULL"), rs, BODY)
    assert not result.dsn_offered and isinstance(result.outcomes[0], Delivered)


async def test_smtputf8_needs_primary_support() -> None:
    p = await Primary(smtputf8=False).start()
    try:
        s = await RelaySession.open([target(p)], settings())
        rs = rcpts("jöe@example.com")
        result = await s.deliver(env(rs, smtputf8=True), rs, "Subject: é\r\n\r\nx\r\n".encode())
        assert isinstance(result.outcomes[0], Bounced)
        assert result.outcomes[0].reply.status == "5.6.7"
        assert p.received == []
    finally:
        await p.stop()


async def test_smtputf8_delivered_when_offered(primary: Primary) -> None:
    s = await RelaySession.open([target(primary)], settings())
    rs = rcpts("jöe@example.com")
    body = "Subject: é\r\n\r\nx\r\n".encode()
    result = await s.deliver(env(rs, smtputf8=True, body_type="8BITMIME"), rs, body)
    assert isinstance(result.outcomes[0], Delivered)
    assert primary.received[0].content == body
    assert "SMTPUTF8" in primary.received[0].mail_options
    assert "BODY=8BITMIME" in primary.received[0].mail_options


async def test_connection_reuse(primary: Primary) -> None:
    s = await RelaySession.open([target(primary)], settings())
    for i in range(5):
        rs = rcpts(f"u{i}@example.com")
        assert isinstance((await s.deliver(env(rs), rs, BODY)).outcomes[0], Delivered)
    await s.quit()
    assert primary.sessions == 1 and len(primary.received) == 5


async def test_refused_then_next_target(primary: Primary) -> None:
    s = await RelaySession.open([target(closed_port()), target(primary)], settings())
    assert s.target.port == primary.port


async def test_nothing_listening() -> None:
    with pytest.raises(ConnectFailed) as info:
        await RelaySession.open([target(closed_port())], settings())
    assert info.value.unreachable and info.value.reply.code == 451
    assert "refused" in info.value.reply.text.lower()


async def test_black_hole_times_out() -> None:
    hole = BlackHole()
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectFailed) as info:
            await RelaySession.open([target(hole)], settings(connect_timeout=0.5))
        assert time.monotonic() - t0 < 3
        assert info.value.unreachable
    finally:
        hole.close()


async def test_banner_421() -> None:
    g = await Greeter("421 4.3.2 too busy").start()
    try:
        with pytest.raises(ConnectFailed) as info:
            await RelaySession.open([target(g)], settings())
        assert info.value.reply.code == 421 and not info.value.unreachable
    finally:
        await g.stop()


async def test_large_body_flow_control(primary: Primary) -> None:
    line = b"x" * 998 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * 6000 + b".dot\r\n"  # ~6 MB, many blocks
    s = await RelaySession.open([target(primary)], settings())
    rs = rcpts("a@example.com")
    result = await asyncio.wait_for(s.deliver(env(rs), rs, body), 30)
    assert isinstance(result.outcomes[0], Delivered)
    assert primary.received[0].content == body


def _tls(**kw: object) -> RelaySettings:
    return RelaySettings(local_hostname="backup.test", connect_timeout=2.0, command_timeout=2.0, data_timeout=5.0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("pipelining", [False, True])
async def test_starttls_opportunistic(tmp_path: Path, pipelining: bool) -> None:
    _, ctx = self_signed(tmp_path)
    p = await Primary(tls_context=ctx, pipelining=pipelining).start()
    try:
        s = await RelaySession.open([target(p)], _tls(tls_verify=False))  # self-signed is fine
        assert s.tls
        rs = rcpts("a@example.com")
        assert isinstance((await s.deliver(env(rs), rs, BODY)).outcomes[0], Delivered)
        assert p.received[0].content == BODY
    finally:
        await p.stop()


async def test_tls_verify_rejects_untrusted_certificate(tmp_path: Path) -> None:
    _, ctx = self_signed(tmp_path)
    p = await Primary(tls_context=ctx).start()
    try:
        with pytest.raises(ConnectFailed) as info:
            await RelaySession.open([target(p)], _tls(tls_verify=True))
        assert info.value.reply.status == "4.7.5" and info.value.reply.code == 451  # deferred, never bounced
        assert p.received == []
    finally:
        await p.stop()


async def test_tls_verify_with_trusted_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, ctx = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    p = await Primary(tls_context=ctx).start()
    try:
        s = await RelaySession.open([target(p)], _tls(tls_verify=True))
        assert s.tls
    finally:
        await p.stop()


async def test_tls_verify_requires_starttls(primary: Primary) -> None:
    with pytest.raises(ConnectFailed) as info:
        await RelaySession.open([target(primary)], _tls(tls_verify=True))
    assert info.value.reply.status == "4.7.4"
