"""The SMTP server over real sockets on loopback, storing into the real SqliteSpool (a stand-in spool
only where a spool fault is the point of the test)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

import pytest

from backupmx.errors import SpoolFullError, SpoolUnavailable
from backupmx.model import Envelope, QueueId
from backupmx.policy import SessionInfo, Stage, Verdict
from backupmx.spool.body import BodyBuffer

from .client import Client
from .conftest import MakeServer, Running

BODY = b"From: s@sender.test\r\nSubject: test\r\n\r\nHello.\r\n.a line with a dot\r\n..two dots\r\n"


async def stored(r: Running) -> dict[str, tuple[Envelope, bytes]]:
    out: dict[str, tuple[Envelope, bytes]] = {}
    for m in await r.spool.list_messages(limit=1000):
        out[m.id] = (m.envelope, await r.spool.read_body(m.id))
    return out


def qid_of(reply: str) -> str:
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    return reply.rsplit(" ", 1)[1]


async def test_message_stored_byte_exact_with_one_received_header(make_server: MakeServer) -> None:
    r = await make_server()
    c = await Client.connect(r.port)
    await c.ehlo()
    await c.send(
        b"MAIL FROM:<s@sender.test> BODY=8BITMIME RET=HDRS ENVID=env+2B1\r\n"
        b"RCPT TO:<Alice@EXAMPLE.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Alice@example.test\r\n"
        b"DATA\r\n"
    )
    assert await c.replies(3) == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    await c.send(BODY.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    qid = qid_of(await c.reply())
    assert await c.cmd("QUIT") == "221 2.0.0 Bye"
    await c.close()
    msgs = await stored(r)
    env, body = msgs[qid]
    assert body.endswith(BODY)
    header = body[: len(body) - len(BODY)]
    assert header.startswith(
        b"Received: from client.test ([127.0.0.1] [127.0.0.1])\r\n\tby mx.test (backupmx node1)"
        b" with ESMTP id " + qid.encode() + b"\r\n\tfor <Alice@example.test>; "
    )
    assert header.count(b"\r\n") == 3 and body.count(b"Received:") == 1
    assert env.sender == "s@sender.test" and env.body_type == "8BITMIME" and env.ret == "HDRS"
    assert env.envid == "env+2B1" and env.client_ip == "127.0.0.1" and env.client_helo == "client.test"
    rc = env.recipients[0]
    assert (rc.address, rc.notify, rc.orcpt) == (
        "Alice@example.test",
        ("SUCCESS", "FAILURE"),
        "rfc822;Alice@example.test",
    )
    st = r.server.statistics()
    assert (st.accepted, st.recipients_accepted, st.sessions_total) == (1, 1, 1)
    assert [e for e, _ in r.events] == ["connect", "queued", "disconnect"]
    q = r.events_named("queued")[0]
    assert q["queue_id"] == qid and q["from"] == "<s@sender.test>" and q["nrcpt"] == 1
    assert b"Hello." not in r.log.getvalue().encode()  # never bodies in the mail log


async def test_whole_session_pipelined_in_one_packet(make_server: MakeServer) -> None:
    r = await make_server(server={"forbid_early_pipelining": False})  # this test pipelines early on purpose
    c = await Client.connect(r.port)
    tx = b"MAIL FROM:<>\r\nRCPT TO:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
    await c.send(b"EHLO c.test\r\n" + tx + b"one\r\n.\r\n" + tx + b"two\r\n.\r\nQUIT\r\n")
    replies = await c.replies(12)
    assert replies[0] == "250 DSN"
    assert replies[4] == replies[9] == "354 End data with <CR><LF>.<CR><LF>"
    assert replies[-1] == "221 2.0.0 Bye"
    ids = [qid_of(replies[5]), qid_of(replies[10])]
    assert await c.read_to_close() == b""
    msgs = await stored(r)
    assert msgs[ids[0]][1].endswith(b"\r\none\r\n") and msgs[ids[1]][1].endswith(b"\r\ntwo\r\n")
    assert b"\r\n\tfor " not in msgs[ids[0]][1]  # two recipients: no "for"
    assert msgs[ids[0]][0].sender == ""


async def test_pipelined_batch_answered_in_one_write(make_server: MakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from backupmx.smtp.protocol import SmtpConnection

    writes: list[bytes] = []
    original = SmtpConnection.data_to_send

    def recording(self: SmtpConnection) -> bytes:
        out = original(self)
        if out:
            writes.append(out)
        return out

    monkeypatch.setattr(SmtpConnection, "data_to_send", recording)
    r = await make_server(server={"forbid_early_pipelining": False})  # this test pipelines early on purpose
    c = await Client.connect(r.port)
    await c.send(
        b"EHLO c.test\r\nMAIL FROM:<s@sender.test>\r\n"
        + b"".join(b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(5))
        + b"DATA\r\n"
    )
    assert (await c.replies(8))[-1].startswith("354 ")
    await c.close()
    batch = [w for w in writes if b"354 " in w]
    assert batch and batch[0].startswith(b"250-mx.test") and batch[0].count(b"250 2.1.5") == 5


@pytest.mark.parametrize(
    "ending", [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\r\n.\r\r\n", b"\r\n\x00.\r\n"], ids=repr
)
async def test_smuggling_over_the_wire_stores_nothing(make_server: MakeServer, ending: bytes) -> None:
    r = await make_server()
    c = await Client.connect(r.port)
    await c.ehlo()
    await c.send(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    await c.replies(3)
    await c.send(
        b"Subject: x\r\n\r\nreal"
        + ending
        + b"MAIL FROM:<spoof@victim.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nspoofed\r\n.\r\nNOOP\r\n"
    )
    assert (await c.reply()).startswith("550 5.5.2 Message contains")
    assert await c.reply() == "250 2.0.0 Ok"  # the NOOP: no second transaction's replies in between
    await c.close()
    assert await stored(r) == {}
    assert r.server.statistics().accepted == 0


async def test_helo_injection_gives_one_received_header(make_server: MakeServer) -> None:
    r = await make_server()
    c = await Client.connect(r.port)
    assert await c.cmd(b"HELO foo\rX-Injected: yes") == "501 5.5.2 Invalid hostname"
    assert await c.cmd("EHLO not_a;valid(name)") == "250 DSN"  # accepted, but shown sanitised
    qid = qid_of(await c.send_mail(b"Subject: x\r\n\r\nbody\r\n"))
    await c.close()
    body = (await stored(r))[qid][1]
    head = body.split(b"\r\n\r\n", 1)[0]
    assert body.count(b"Received:") == 1 and b"X-Injected" not in body
    assert head.startswith(b"Received: from not_a_valid_name_ ([127.0.0.1] [127.0.0.1])\r\n\tby mx.test")
    assert all(ln.startswith((b"Received:", b"\t", b"Subject:")) for ln in head.split(b"\r\n"))


async def test_eight_bit_body_and_long_lines_stored_as_sent(make_server: MakeServer) -> None:
    r = await make_server()
    body = "Subject: caf\u00e9\r\n\r\n".encode() + b"\xff\xfe 8-bit \x80\r\n" + b"L" * 5000 + b"\r\n"
    c = await Client.connect(r.port)
    await c.ehlo()
    qid = qid_of(await c.send_mail(body))  # no BODY=8BITMIME: accepted (RELIABILITY.md #45 policy)
    await c.close()
    assert (await stored(r))[qid][1].endswith(body)


async def test_ipv6_listener(make_server: MakeServer) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    r = await make_server(server={"listen": ["[::1]:0"]})
    host, port = r.server.bound[0]
    assert host == "::1"
    c = await Client.connect(port, host="::1")
    await c.ehlo()
    qid = qid_of(await c.send_mail(BODY))
    await c.close()
    body = (await stored(r))[qid][1]
    assert body.startswith(b"Received: from client.test ([IPv6:::1] [::1])\r\n")


async def test_half_closing_client_still_gets_its_replies(make_server: MakeServer) -> None:
    r = await make_server(server={"forbid_early_pipelining": False})  # this test pipelines early on purpose
    c = await Client.connect(r.port)
    await c.send(
        b"EHLO c.test\r\nMAIL FROM:<s@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        b"Subject: x\r\n\r\nhalf-closed\r\n.\r\nQUIT\r\n"
    )
    c.writer.write_eof()
    rest = (await c.read_to_close()).decode()
    assert "250 2.0.0 Ok: queued as " in rest and rest.endswith("221 2.0.0 Bye\r\n"), rest
    assert len(await stored(r)) == 1


async def test_relay_denied_and_unknown_user_store_nothing(make_server: MakeServer) -> None:
    r = await make_server(domains=[{"name": "example.test", "recipients": ["alice@example.test"]}])
    c = await Client.connect(r.port)
    await c.ehlo()
    await c.cmd("MAIL FROM:<s@sender.test>")
    assert await c.cmd("RCPT TO:<u@elsewhere.test>") == "554 5.7.1 <u@elsewhere.test>: Relay access denied"
    assert await c.cmd("RCPT TO:<u@[127.0.0.1]>") == "554 5.7.1 <u@[127.0.0.1]>: Relay access denied"
    assert (
        await c.cmd("RCPT TO:<u@example.test.evil.test>") == "554 5.7.1 <u@example.test.evil.test>: Relay access denied"
    )
    assert await c.cmd("RCPT TO:<@example.test:u@evil.test>") == "554 5.7.1 <u@evil.test>: Relay access denied"
    assert (
        await c.cmd("RCPT TO:<bob@example.test>")
        == "550 5.1.1 <bob@example.test>: Recipient address rejected: User unknown"
    )
    assert await c.cmd("RCPT TO:<postmaster>") == "250 2.1.5 Ok"
    assert await c.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
    qid = qid_of(await c.cmd(b"hi\r\n."))
    await c.close()
    env = (await stored(r))[qid][0]
    assert [x.address for x in env.recipients] == ["postmaster@example.test"]
    rejects = r.events_named("reject")
    assert len(rejects) == 5 and rejects[0]["stage"] == "rcpt" and rejects[0]["recipient"] == "<u@elsewhere.test>"
    assert r.server.statistics().rejected == 5


class FaultySpool:
    """Stands in for the spool only to fake a fault; stores in memory otherwise."""

    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc
        self.bodies: dict[str, bytes] = {}

    async def put_with_id(
        self, queue_id: QueueId, envelope: Envelope, body: BodyBuffer, *, now: float | None = None
    ) -> QueueId:
        await asyncio.sleep(0)
        if self.exc is not None:
            raise self.exc
        self.bodies[queue_id] = body.getvalue()
        return queue_id


@pytest.mark.parametrize(
    "exc,reply",
    [
        (SpoolFullError("SQLITE_FULL"), "452 4.3.1 Insufficient system storage"),
        (SpoolUnavailable("locked"), "451 4.3.0 Error: queue file write error, try again later"),
        (RuntimeError("a bug"), "451 4.3.0 Error: queue file write error, try again later"),
    ],
)
async def test_spool_failure_answers_4xx_and_server_stays_up(
    make_server: MakeServer, exc: Exception, reply: str
) -> None:
    spool = FaultySpool(exc)
    r = await make_server(spool=spool)
    c = await Client.connect(r.port)
    await c.ehlo()
    assert await c.send_mail(BODY) == reply
    spool.exc = None  # space freed / database back: the same session is served again
    qid = qid_of(await c.send_mail(BODY))
    assert spool.bodies[qid].endswith(BODY)
    await c.close()
    c2 = await Client.connect(r.port)
    assert await c2.cmd("NOOP") == "250 2.0.0 Ok"
    await c2.close()
    assert r.server.statistics().spool_errors == 1


async def test_low_disk_refuses_mail(make_server: MakeServer) -> None:
    r = await make_server(server={"min_free_disk": "1000000GB"})
    c = await Client.connect(r.port)
    await c.ehlo()
    assert await c.cmd("MAIL FROM:<s@sender.test>") == "452 4.3.1 Insufficient system storage"
    assert await c.cmd("RCPT TO:<alice@example.test>") == "503 5.5.1 Error: need MAIL command"
    await c.close()


async def test_size_limits(make_server: MakeServer) -> None:
    r = await make_server(server={"max_message_size": 100_000})
    c = await Client.connect(r.port)
    await c.ehlo()
    assert (
        await c.cmd("MAIL FROM:<s@sender.test> SIZE=100001")
        == "552 5.3.4 Message size exceeds fixed maximum message size"
    )
    big = (b"x" * 998 + b"\r\n") * 300
    assert await c.send_mail(big) == "552 5.3.4 Message size exceeds fixed maximum message size"
    qid_of(await c.send_mail(BODY))  # the session goes on
    await c.close()
    assert len(await stored(r)) == 1


async def test_large_message_through_temp_file(make_server: MakeServer) -> None:
    r = await make_server()
    body = b"Subject: big\r\n\r\n" + b"".join(b"%08d " % i + b"y" * 60 + b"\r\n" for i in range(50_000))
    c = await Client.connect(r.port)
    await c.ehlo()
    qid = qid_of(await c.send_mail(body))
    await c.close()
    assert (await stored(r))[qid][1].endswith(body)


async def test_hop_limit(make_server: MakeServer) -> None:
    r = await make_server(server={"max_received_headers": 3})
    c = await Client.connect(r.port)
    await c.ehlo()
    hops = b"Received: from a\r\n" * 4
    assert await c.send_mail(hops + b"\r\nbody\r\n") == "554 5.4.6 Too many hops"
    qid_of(await c.send_mail(hops[:54] + b"\r\nbody\r\n"))
    await c.close()


async def test_ten_megabyte_line_then_session_continues(make_server: MakeServer) -> None:
    r = await make_server()
    c = await Client.connect(r.port)
    await c.ehlo()
    chunk = b"B" * (1 << 20)
    for _ in range(10):
        await c.send(chunk)
    assert await c.cmd(b"") == "500 5.5.2 Line too long"
    assert await c.cmd("NOOP") == "250 2.0.0 Ok"
    await c.close()


async def test_connection_limits(make_server: MakeServer) -> None:
    r = await make_server(server={"max_connections": 3, "max_connections_per_ip": 2})
    a = await Client.connect(r.port)
    b = await Client.connect(r.port)
    c = await Client.connect(r.port, banner=False)
    assert await c.reply() == "421 4.7.0 Too many connections"
    assert await c.read_to_close() == b""
    await a.cmd("QUIT")
    await a.read_to_close()
    for _ in range(100):  # the server notices the close a moment later
        if r.server.statistics().sessions_open == 1:
            break
        await asyncio.sleep(0.01)
    d = await Client.connect(r.port)
    await d.close()
    await b.close()
    st = r.server.statistics()
    assert st.connections_refused == 1
    assert r.events_named("reject")[0]["stage"] == "connect"


async def test_max_commands(make_server: MakeServer) -> None:
    r = await make_server(server={"max_commands": 10})
    c = await Client.connect(r.port)
    await c.send(b"NOOP\r\n" * 12)
    assert await c.replies(11) == ["250 2.0.0 Ok"] * 10 + ["421 4.7.0 Error: too many commands, closing connection"]
    assert await c.read_to_close() == b""


async def test_idle_timeout(make_server: MakeServer) -> None:
    r = await make_server(server={"idle_timeout": "300ms"})
    c = await Client.connect(r.port)
    await c.ehlo()
    assert await c.reply() == "421 4.4.2 mx.test Error: timeout exceeded"
    assert await c.read_to_close() == b""
    assert r.server.statistics().timeouts == 1


async def test_data_trickle_rearms_idle_timer_but_session_cap_holds(make_server: MakeServer) -> None:
    r = await make_server(server={"idle_timeout": "400ms", "session_timeout": "10s"})
    c = await Client.connect(r.port)
    await c.ehlo()
    await c.send(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    await c.replies(3)
    for i in range(8):  # 1.6 s in all, four times the idle timeout, one chunk every 0.2 s
        await c.send(b"line %d\r\n" % i)
        await asyncio.sleep(0.2)
    qid_of(await c.cmd(b"."))
    await c.close()

    r2 = await make_server(server={"idle_timeout": "400ms", "session_timeout": "1s"})
    c = await Client.connect(r2.port)
    await c.ehlo()
    await c.send(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    await c.replies(3)
    got = b""
    for i in range(15):  # a line every 0.2 s until the server speaks (bounded: 3 s)
        try:
            await c.send(b"line %d\r\n" % i)
        except ConnectionError:
            break
        try:
            got = await asyncio.wait_for(c.reader.readline(), 0.2)
            break
        except TimeoutError:
            continue
    got = got or await c.read_to_close()
    assert got.startswith(b"421 4.4.2 mx.test Error: session too long"), got
    assert await stored(r2) == {}


async def test_greeting_delay(make_server: MakeServer) -> None:
    r = await make_server(server={"greeting_delay": "300ms"})
    eager = await Client.connect(r.port, banner=False)
    await eager.send(b"EHLO eager.test\r\n")
    assert await eager.reply() == "554 5.5.1 Protocol error: talked before greeting"
    assert await eager.read_to_close() == b""
    polite = await Client.connect(r.port)
    assert await polite.ehlo() == "250 DSN"
    await polite.close()
    assert any(f.get("reason") == "pregreet" for f in r.events_named("reject"))


async def test_pipelined_ehlo_without_greeting_delay_is_fine(make_server: MakeServer) -> None:
    r = await make_server()
    c = await Client.connect(r.port, banner=False)
    await c.send(b"EHLO fast.test\r\n")  # may arrive before the banner is written
    assert (await c.reply()).startswith("220 ")
    assert await c.reply() == "250 DSN"
    await c.close()


async def test_policy_error_is_temporary(make_server: MakeServer) -> None:
    class Broken:
        name = "broken"
        stages = frozenset({Stage.RCPT})

        async def check(self, stage: Stage, session: SessionInfo, address: str | None) -> Verdict:
            raise RuntimeError("a bug in a check")

    r = await make_server(checks=[Broken()])
    c = await Client.connect(r.port)
    await c.ehlo()
    await c.cmd("MAIL FROM:<s@sender.test>")
    assert await c.cmd("RCPT TO:<alice@example.test>") == "451 4.3.0 Error: internal error, try again later"
    await c.close()


async def test_client_vanishing_mid_data_stores_nothing(make_server: MakeServer) -> None:
    r = await make_server()
    c = await Client.connect(r.port)
    await c.ehlo()
    await c.send(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    await c.replies(3)
    await c.send(b"Subject: half\r\n\r\n" + b"z" * 500_000)
    await c.close()
    for _ in range(200):
        if r.server.statistics().sessions_open == 0:
            break
        await asyncio.sleep(0.01)
    assert r.server.statistics().sessions_open == 0
    assert await stored(r) == {}
    assert r.events_named("disconnect")


# --- TLS ------------------------------------------------------------------------------------------
async def test_starttls_session(
    make_server: MakeServer, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    r = await make_server(tls_context=server_tls)
    c = await Client.connect(r.port)
    await c.ehlo()
    assert "250 STARTTLS" in c.lines
    assert await c.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    await c.starttls(client_tls)
    assert await c.cmd("MAIL FROM:<s@sender.test>") == "503 5.5.1 Error: send HELO/EHLO first"
    n = len(c.lines)
    assert await c.ehlo() == "250 DSN"
    assert not any("STARTTLS" in ln for ln in c.lines[n:])
    qid = qid_of(await c.send_mail(BODY))
    await c.close()
    body = (await stored(r))[qid][1]
    assert b" with ESMTPS id " + qid.encode() in body
    assert r.server.statistics().tls_sessions == 1


async def test_starttls_plaintext_injection_discarded(
    make_server: MakeServer, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    r = await make_server(tls_context=server_tls)
    c = await Client.connect(r.port)
    await c.ehlo()
    await c.send(b"STARTTLS\r\nRSET\r\n")
    assert await c.reply() == "220 2.0.0 Ready to start TLS"
    await c.starttls(client_tls)
    # had RSET been executed, its 250 would come before HELP's 214
    assert (await c.cmd("HELP")).startswith("214 ")
    await c.close()


async def test_failed_handshake_does_not_hurt_the_server(make_server: MakeServer, server_tls: ssl.SSLContext) -> None:
    r = await make_server(tls_context=server_tls)
    c = await Client.connect(r.port)
    await c.ehlo()
    await c.send(b"STARTTLS\r\n")
    assert await c.reply() == "220 2.0.0 Ready to start TLS"
    await c.send(b"this is not a TLS client hello\r\n" * 20)
    await c.read_to_close()
    c2 = await Client.connect(r.port)
    assert await c2.cmd("NOOP") == "250 2.0.0 Ok"
    await c2.close()


async def test_set_tls_context(make_server: MakeServer, server_tls: ssl.SSLContext) -> None:
    r = await make_server()
    c = await Client.connect(r.port)
    await c.ehlo()
    assert not any("STARTTLS" in ln for ln in c.lines)
    assert await c.cmd("STARTTLS") == "502 5.5.1 Error: command not implemented"
    await c.close()
    r.server.set_tls_context(server_tls)
    c = await Client.connect(r.port)
    await c.ehlo()
    assert "250 STARTTLS" in c.lines
    await c.close()


# --- graceful stop --------------------------------------------------------------------------------
async def test_stop_idle_sessions_and_new_connections_get_421(make_server: MakeServer) -> None:
    r = await make_server()
    idle = await Client.connect(r.port)
    await idle.ehlo()
    busy = await Client.connect(r.port)
    await busy.ehlo()
    await busy.send(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    await busy.replies(3)
    await busy.send(b"Subject: in flight\r\n\r\npart one\r\n")
    stopping = asyncio.create_task(r.server.stop(grace=5.0))
    assert await idle.reply() == "421 4.3.2 Service shutting down, closing transmission channel"
    assert await idle.read_to_close() == b""
    late = await Client.connect(r.port, banner=False)  # arrives while stopping: told, not dropped
    assert await late.reply() == "421 4.3.2 Service shutting down, closing transmission channel"
    assert not stopping.done()
    qid = qid_of(await busy.cmd(b"part two\r\n."))  # the transaction in DATA finishes: commit and 250
    assert await busy.reply() == "421 4.3.2 Service shutting down, closing transmission channel"
    await asyncio.wait_for(stopping, 10)
    assert (await stored(r))[qid][1].endswith(b"part one\r\npart two\r\n")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", r.port), timeout=2).close()


async def test_stop_past_grace_answers_421_and_stores_nothing(make_server: MakeServer) -> None:
    r = await make_server(server={"forbid_early_pipelining": False})  # this test pipelines early on purpose
    busy = await Client.connect(r.port)
    await busy.ehlo()
    await busy.send(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\npart one\r\n")
    await busy.replies(3)
    await asyncio.wait_for(r.server.stop(grace=0.3), 10)
    assert await busy.reply() == "421 4.3.2 Service shutting down, closing transmission channel"
    assert await stored(r) == {}


async def test_stop_does_not_cut_a_commit(make_server: MakeServer) -> None:
    class SlowSpool(FaultySpool):
        async def put_with_id(
            self, queue_id: QueueId, envelope: Envelope, body: BodyBuffer, *, now: float | None = None
        ) -> QueueId:
            await asyncio.sleep(0.5)
            return await super().put_with_id(queue_id, envelope, body)

    spool = SlowSpool(None)
    r = await make_server(spool=spool)
    c = await Client.connect(r.port)
    await c.ehlo()
    await c.send(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    await c.replies(3)
    await c.send(b"x\r\n.\r\n")
    await asyncio.sleep(0.1)  # the commit has started
    await asyncio.wait_for(r.server.stop(grace=0.1), 20)
    qid = qid_of(await c.reply())
    assert qid in spool.bodies


# --- API ------------------------------------------------------------------------------------------
async def test_bound_and_on_queued(make_server: MakeServer) -> None:
    r = await make_server(server={"listen": ["127.0.0.1:0", "127.0.0.1:0"]})
    assert len(r.server.bound) == 2 and all(h == "127.0.0.1" and p > 0 for h, p in r.server.bound)
    seen: list[tuple[str, frozenset[str]]] = []
    r.server.on_queued = lambda qid, domains: seen.append((qid, domains))
    c = await Client.connect(r.server.bound[1][1])
    await c.ehlo()
    qid = qid_of(await c.send_mail(BODY))
    await c.close()
    assert seen == [(qid, frozenset({"example.test"}))]


async def test_statistics_snapshot_is_frozen(make_server: MakeServer) -> None:
    r = await make_server()
    st = r.server.statistics()
    with pytest.raises(AttributeError):
        st.accepted = 5  # type: ignore[misc]
    assert st.sessions_open == 0


async def test_stop_is_idempotent(make_server: MakeServer) -> None:
    r: Any = await make_server()
    await r.server.stop(grace=0)
    await r.server.stop(grace=0)
