"""Issue 12 against a real `backupmx serve` and the scripted primary, counting copies at the primary
(exactly one each): 8-bit replies at every stage are recorded (item 1), DSN parameters that decode to
line breaks are refused at the command and no DSN carries an injected line (item 2), SMTPUTF8-flagged
ASCII mail goes as plain SMTP and only what needs UTF-8 bounces (item 8), and the DSN to a UTF-8
sender has a raw UTF-8 `To:` (item 9). One node and one primary serve the whole module."""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backupmx.model import MessageKind, MessageRecord, RecipientState
from backupmx.spool import QueueFilter
from backupmx.spool.sqlite import SqliteSpool
from tests.support.ports import free_port
from tests.support.scripted_primary import Answer, Command, ScriptedPrimary
from tests.support.serve import ServeProcess

FINAL = {RecipientState.DELIVERED, RecipientState.BOUNCED}
LATIN_250 = b"250 2.0.0 Ok: Nachricht f\xfcr M\xfcller angenommen\r\n"
LATIN_550 = b"550 5.7.1 Nachricht f\xfcr M\xfcller abgelehnt\r\n"
LATIN_451 = b"451 4.3.0 Bitte sp\xe4ter noch einmal\r\n"


@dataclass
class Bench:
    node: ServeProcess
    primary: ScriptedPrimary


def _dot(cmd: Command, tries: dict[str, int] = {}) -> Answer:  # noqa: B006 (per-process memory on purpose)
    rcpt = cmd.transaction.recipients[0] if cmd.transaction.recipients else ""
    tries[rcpt] = tries.get(rcpt, 0) + 1
    if rcpt.startswith("latin250@"):
        return Answer.of(LATIN_250)
    if rcpt.startswith("latin550@"):
        return Answer.of(LATIN_550)
    if rcpt.startswith("latin451@") and tries[rcpt] == 1:
        return Answer.of(LATIN_451)
    if rcpt.startswith("split@"):  # a multi-line 8-bit reply in three packets
        return Answer.of(b"250-2.0.0 Ok: f\xfc", b"r Sie\r\n250 2.0.0 gespeichert \xe4\xf6\xfc", b"\r\n", delay=0.1)
    return Answer.of(b"250 2.0.0 Ok: queued as SCRIPTED\r\n")


def _rcpt(cmd: Command) -> bytes:
    if b"rcpt550@" in cmd.arg:
        return b"550 5.1.1 Unbekannter Empf\xe4nger\r\n"
    return b"250 2.1.5 Ok\r\n"


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    primary = ScriptedPrimary()  # no DSN, no SMTPUTF8
    primary.default("DOT", _dot).default("RCPT", _rcpt)
    with primary.running():
        node = ServeProcess(
            tmp_path_factory.mktemp("badday"),
            domains=[{"name": "example.test", "primary": [primary.hostport], "recipients": "any"}],
            delivery={"lease": "4s", "retry_min": "1s", "retry_max": "2s"},
            extra={"dns": {"nameservers": [f"127.0.0.1:{free_port()}"], "timeout": "1s"}},
        )
        with node:
            node.start()
            yield Bench(node, primary)


def send(
    port: int,
    sender: str,
    rcpts: list[str],
    body: bytes,
    *,
    mail_options: tuple[str, ...] = (),
    rcpt_options: tuple[str, ...] = (),
) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo("client.test")
        code, msg = c.mail(sender, list(mail_options))
        assert code == 250, msg
        for r in rcpts:
            code, msg = c.rcpt(r, list(rcpt_options))
            assert code == 250, msg
        code, msg = c.data(body)
        assert code == 250, msg


def command(port: int, *lines: str) -> list[tuple[int, str]]:
    """Raw commands (after EHLO), each reply as (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo("client.test")
        out = []
        for line in lines:
            c.putcmd(line)
            code, msg = c.getreply()
            out.append((code, msg.decode("utf-8", "replace")))
        return out


def spool_view(data_dir: Path) -> list[tuple[MessageRecord, bytes]]:
    async def read() -> list[tuple[MessageRecord, bytes]]:
        spool = SqliteSpool(data_dir)
        await spool.open()
        try:
            listed = await spool.list_messages(QueueFilter(pending_only=False), limit=500)
            return [(m, await spool.read_body(m.id)) for m in listed]
        finally:
            await spool.close()

    return asyncio.run(read())


def settle(b: Bench, rcpt: str, timeout: float = 20.0) -> tuple[MessageRecord, list[tuple[MessageRecord, bytes]]]:
    """Wait (bounded) until the user message for `rcpt` has a final state; it and the DSNs to its sender."""
    deadline = time.monotonic() + timeout
    while True:
        view = spool_view(b.node.data_dir)
        mine = [
            m for m, _ in view if m.envelope.kind is MessageKind.USER and any(r.address == rcpt for r in m.recipients)
        ]
        if mine and {r.state for r in mine[0].recipients} <= FINAL:
            dsns = [(m, body) for m, body in view if m.envelope.kind is MessageKind.DSN and mine[0].id.encode() in body]
            return mine[0], dsns
        if time.monotonic() > deadline:
            raise AssertionError(f"{rcpt}: no final state within {timeout}s: {mine}\n{b.node.log()[-3000:]}")
        time.sleep(0.2)


def body_for(tag: str, subject: str = "hello") -> bytes:
    return f"From: s@sender.test\r\nSubject: {subject} {tag}\r\n\r\nbody of {tag}\r\n".encode()


# --- item 1: 8-bit replies ---------------------------------------------------------------------------
def test_8bit_250_recorded_once(bench: Bench) -> None:
    send(bench.node.port, "s@sender.test", ["latin250@example.test"], body_for("latin250"))
    msg, dsns = settle(bench, "latin250@example.test")
    r = msg.recipients[0]
    assert r.state is RecipientState.DELIVERED and r.attempts == 1
    assert r.last_reply == "250 2.0.0 Ok: Nachricht für Müller angenommen"
    assert bench.primary.copies("latin250@example.test") == 1 and dsns == []


def test_8bit_split_multiline_250_recorded_once(bench: Bench) -> None:
    send(bench.node.port, "s@sender.test", ["split@example.test"], body_for("split"))
    msg, _ = settle(bench, "split@example.test")
    assert msg.recipients[0].state is RecipientState.DELIVERED
    assert "für Sie" in (msg.recipients[0].last_reply or "")
    assert bench.primary.copies("split@example.test") == 1


def test_8bit_550_after_dot_bounces_with_a_dsn(bench: Bench) -> None:
    send(bench.node.port, "s@sender.test", ["latin550@example.test"], body_for("latin550"))
    msg, dsns = settle(bench, "latin550@example.test")
    assert msg.recipients[0].state is RecipientState.BOUNCED
    assert msg.recipients[0].last_reply == "550 5.7.1 Nachricht für Müller abgelehnt"
    assert len(dsns) == 1 and "Müller abgelehnt".encode() in dsns[0][1]
    assert len([t for t in bench.primary.transactions if "latin550@example.test" in t.recipients]) == 1


def test_8bit_550_at_rcpt_bounces(bench: Bench) -> None:
    send(bench.node.port, "s@sender.test", ["rcpt550@example.test"], body_for("rcpt550"))
    msg, dsns = settle(bench, "rcpt550@example.test")
    assert msg.recipients[0].state is RecipientState.BOUNCED
    assert msg.recipients[0].last_reply == "550 5.1.1 Unbekannter Empfänger"
    assert len(dsns) == 1 and bench.primary.copies("rcpt550@example.test") == 0


def test_8bit_451_then_250_one_copy(bench: Bench) -> None:
    send(bench.node.port, "s@sender.test", ["latin451@example.test"], body_for("latin451"))
    msg, dsns = settle(bench, "latin451@example.test")
    assert msg.recipients[0].state is RecipientState.DELIVERED and msg.recipients[0].attempts == 2
    assert bench.primary.copies("latin451@example.test") == 1 and dsns == []


# --- item 2: CR/LF in DSN parameters -----------------------------------------------------------------
def test_crlf_in_envid_or_orcpt_refused_at_the_command(bench: Bench) -> None:
    port = bench.node.port
    assert command(port, "MAIL FROM:<s@sender.test> ENVID=+0D+0AX-Injected:+20yes")[0] == (
        501,
        "5.5.4 Bad ENVID parameter: must be printable US-ASCII once decoded",
    )
    assert command(port, "MAIL FROM:<s@sender.test> SMTPUTF8 ENVID=x+0Ay")[0][0] == 501
    got = command(
        port,
        "MAIL FROM:<s@sender.test>",
        "RCPT TO:<inject@example.test> NOTIFY=SUCCESS ORCPT=rfc822;a+0D+0Ab@example.test",
    )
    assert got == [(250, "2.1.0 Ok"), (501, "5.5.4 Bad ORCPT parameter: control characters once decoded")]


@pytest.mark.parametrize("utf8", [False, True])
def test_relayed_dsn_carries_envid_and_orcpt_safely(bench: Bench, utf8: bool) -> None:
    rcpt = f"relayed{int(utf8)}@example.test"
    send(
        bench.node.port,
        "s@sender.test",
        [rcpt],
        body_for(rcpt),
        mail_options=("ENVID=id+2B1+3A+20x", *(["SMTPUTF8"] if utf8 else [])),
        rcpt_options=("NOTIFY=SUCCESS", "ORCPT=rfc822;a+2Bb@example.test"),
    )
    msg, dsns = settle(bench, rcpt)
    assert msg.recipients[0].state is RecipientState.DELIVERED
    assert bench.primary.copies(rcpt) == 1
    assert len(dsns) == 1  # "relayed": this primary offers no DSN
    dsn = dsns[0][1]
    assert b"Original-Envelope-Id: id+1: x\r\n" in dsn
    assert b"Original-Recipient: rfc822; a+b@example.test\r\n" in dsn
    assert b"Action: relayed\r\n" in dsn


# --- items 8 and 9: SMTPUTF8 ----------------------------------------------------------------------------
def test_smtputf8_flagged_ascii_mail_goes_as_plain_smtp(bench: Bench) -> None:
    send(
        bench.node.port, "s@sender.test", ["asciiutf8@example.test"], body_for("asciiutf8"), mail_options=("SMTPUTF8",)
    )
    msg, dsns = settle(bench, "asciiutf8@example.test")
    assert msg.recipients[0].state is RecipientState.DELIVERED and dsns == []
    (t,) = [t for t in bench.primary.delivered() if "asciiutf8@example.test" in t.recipients]
    assert b"SMTPUTF8" not in t.mail


def test_utf8_header_bounces_and_utf8_sender_gets_a_raw_utf8_to(tmp_path: Path) -> None:
    # Its own node, whose primary is not listening when the mail comes in: once the probe has seen a
    # primary without SMTPUTF8, a UTF-8 sender is refused at MAIL (policy/mirror.py); accepted before that,
    # the message is bounced at delivery, and the DSN to the UTF-8 sender is what this test reads. No outage
    # is declared meanwhile (down_after), so the bounce is not held by the recovery guard.
    port = free_port()
    primary = ScriptedPrimary()  # no DSN, no SMTPUTF8
    node = ServeProcess(
        tmp_path / "utf8",
        domains=[{"name": "example.test", "primary": [f"127.0.0.1:{port}"], "recipients": "any"}],
        delivery={"lease": "4s", "retry_min": "1s", "retry_max": "2s", "probe_interval": "1s", "down_after": 1000},
        extra={"dns": {"nameservers": [f"127.0.0.1:{free_port()}"], "timeout": "1s"}},
    )
    sender = "j\u00f6rg@b\u00fccher.test"
    with node:
        node.start()
        send(
            node.port,
            sender,
            ["needsutf8@example.test"],
            body_for("needsutf8", "gr\u00fc\u00dfe"),
            mail_options=("SMTPUTF8",),
        )
        with primary.running(port):
            msg, dsns = settle(Bench(node, primary), "needsutf8@example.test")
    r = msg.recipients[0]
    assert r.state is RecipientState.BOUNCED and (r.last_reply or "").startswith("554 5.6.7 SMTPUTF8 is required")
    assert not [t for t in primary.transactions if "needsutf8@example.test" in t.recipients]
    assert len(dsns) == 1
    dsn_msg, dsn = dsns[0]
    assert [x.address for x in dsn_msg.recipients] == [sender]
    head = dsn.split(b"\r\n\r\n", 1)[0]
    assert f"\r\nTo: <{sender}>\r\n".encode() in head and b"=?utf-8?" not in head
    assert b"message/global-delivery-status" in dsn
