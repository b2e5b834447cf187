"""The sans-IO protocol, byte by byte: pipelining, DATA framing and transparency, smuggling endings,
limits, sequence errors, STARTTLS injection. No sockets."""

from __future__ import annotations

import random

import pytest

from backupmx.reply import Reply
from backupmx.smtp.protocol import (
    CLOSED,
    NEED_DATA,
    DataComplete,
    DataRejected,
    Hello,
    MailFrom,
    ProtocolConfig,
    ProtocolUsageError,
    RcptTo,
    Rejected,
    SmtpConnection,
    StartTls,
    State,
)

from .harness import Harness

TX = b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<u@ours.test>\r\nDATA\r\n"


def test_whole_pipelined_transaction_in_one_packet() -> None:
    h = Harness()
    out = h.feed(b"EHLO client.test\r\n" + TX + b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert out == [
        "250 DSN",
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as Q1",
        "221 2.0.0 Bye",
    ]
    assert [s.body for s in h.stored] == [b"Subject: hi\r\n\r\nbody\r\n"]
    assert h.stored[0].transaction.sender == "s@sender.test"
    assert h.conn.next_event() is CLOSED


def test_ehlo_advertises_extensions() -> None:
    h = Harness.make(max_message_size=1234)
    h.feed(b"EHLO c.test\r\n")
    assert h.replies[1:] == [
        "250-mx.test",
        "250-PIPELINING",
        "250-SIZE 1234",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-ENHANCEDSTATUSCODES",
        "250 DSN",
    ]
    t = Harness.make(tls_available=True)
    t.feed(b"EHLO c.test\r\n")
    assert t.replies[-1] == "250 STARTTLS"
    helo = Harness()
    assert helo.feed(b"HELO c.test\r\n") == ["250 mx.test"]


def test_second_transaction_pipelined_before_reply_to_first_dot() -> None:
    h = Harness()
    h.ehlo()
    out = h.feed(TX + b"one\r\n.\r\n" + TX + b"two\r\n.\r\n")
    assert out == [
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as Q1",
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as Q2",
    ]
    assert [s.body for s in h.stored] == [b"one\r\n", b"two\r\n"]


@pytest.mark.parametrize(
    "content,stored",
    [
        (b"..x\r\n", b".x\r\n"),
        (b"a\r\n..\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r\n...\r\n", b"a\r\n..\r\n"),
        (b"", b""),  # ".\r\n" right after the 354: an empty message
        (b"x.\r\n", b"x.\r\n"),
        (b"a\r\n.x\r\n", b"a\r\nx\r\n"),  # RFC 5321 4.5.2: the first dot of a line is removed
    ],
)
def test_dot_transparency(content: bytes, stored: bytes) -> None:
    h = Harness()
    h.ehlo()
    h.feed(TX + content + b".\r\n")
    assert [s.body for s in h.stored] == [stored]


SMUGGLING_ENDINGS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r.\r",
    b"\r\n\x00.\r\n",
    b"\r\r\n.\r\r\n",
    b"\r.\n",
    b"\n.\r",
    b"\r\n.\n",
]


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=repr)
def test_smuggling_endings_never_end_data(ending: bytes) -> None:
    h = Harness()
    h.ehlo()
    smuggled = b"MAIL FROM:<spoof@victim.test>\r\nRCPT TO:<u@ours.test>\r\nDATA\r\nSpoofed\r\n"
    out = h.feed(TX + b"Subject: real\r\n\r\nbody" + ending + smuggled + b".\r\nQUIT\r\n")
    assert out[-2:] == [
        "550 5.5.2 " + ("Message contains NUL character" if b"\x00" in ending else "Message contains bare CR or LF"),
        "221 2.0.0 Bye",
    ]
    assert h.stored == []
    assert len(h.of(MailFrom)) == 1  # the smuggled MAIL stayed body text: no second transaction
    assert len(h.of(DataRejected)) == 1


@pytest.mark.parametrize("content", [b"a\nb\r\n", b"a\rb\r\n", b"\n", b"a\r\n\r", b"x\x00y\r\n"], ids=repr)
def test_bare_cr_lf_nul_rejected_after_real_end(content: bytes) -> None:
    h = Harness()
    h.ehlo()
    out = h.feed(TX + content + b"\r\n.\r\nNOOP\r\n")
    assert out[-2].startswith("550 5.5.2") and out[-1] == "250 2.0.0 Ok"
    assert h.stored == []


def _unstuff(stuffed: bytes) -> bytes:
    lines = stuffed.split(b"\r\n")
    return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in lines)


def test_chunk_boundaries_anywhere_give_the_same_message() -> None:
    rng = random.Random(5321)
    alphabet = [b"a", b".", b"\r\n", b"..", b"\r\n.", b"Received: x", b" ", b"\r\nRECEIVED:", b"\r\n\r\n"]
    for _ in range(300):
        parts = [rng.choice(alphabet) for _ in range(rng.randint(0, 40))]
        raw = b"".join(parts) + b"\r\n"
        # valid content: no bare CR/LF (the alphabet only has CRLF) and no terminator inside
        while b"\r\n.\r\n" in b"\r\n" + raw:
            raw = (b"\r\n" + raw).replace(b"\r\n.\r\n", b"\r\n..\r\n")[2:]
        expected = _unstuff(raw)
        wire = TX + raw + b".\r\n"
        h = Harness()
        h.ehlo()
        pos = 0
        while pos < len(wire):
            step = rng.choice([1, 1, 2, 3, 5, 7, 64])
            h.feed(wire[pos : pos + step])
            pos += step
        assert [s.body for s in h.stored] == [expected], raw
        head = (b"\r\n" + expected).split(b"\r\n\r\n", 1)[0].lower()
        done = h.of(DataComplete)[0]
        assert isinstance(done, DataComplete) and done.received_headers == head.count(b"\r\nreceived:"), raw


def test_bytewise_feed_of_smuggling_still_rejected() -> None:
    h = Harness()
    h.ehlo()
    wire = TX + b"x\n.\r\nMAIL FROM:<spoof@x.test>\r\n.\r\n"
    for i in range(len(wire)):
        h.feed(wire[i : i + 1])
    assert h.stored == [] and len(h.of(MailFrom)) == 1
    assert h.replies[-1] == "550 5.5.2 Message contains bare CR or LF"


def test_data_chunks_are_large_not_per_line() -> None:
    h = Harness()
    h.ehlo()
    h.feed(TX)
    body = b"line of text\r\n" * 20000
    h.conn.receive_data(body + b".\r\n")
    ev = h.conn.next_event()
    assert type(ev).__name__ == "DataChunk" and len(ev.data) == len(body)  # type: ignore[union-attr]


def test_size_limit_streams_reads_to_end_and_bounds_memory() -> None:
    h = Harness.make(max_message_size=10_000)
    h.ehlo()
    h.feed(TX)
    peak_chunks = 0
    for _ in range(200):
        h.feed(b"x" * 998 + b"\r\n")
        peak_chunks = max(peak_chunks, sum(len(c) for c in h.chunks))
        assert h.conn.buffered < 2048
    out = h.feed(b".\r\nNOOP\r\n")
    assert out == ["552 5.3.4 Message size exceeds fixed maximum message size", "250 2.0.0 Ok"]
    assert peak_chunks <= 10_000
    assert h.stored == []


def test_size_at_limit_is_accepted() -> None:
    h = Harness.make(max_message_size=10)
    h.ehlo()
    h.feed(TX + b"12345678\r\n.\r\n")
    assert [s.body for s in h.stored] == [b"12345678\r\n"]


@pytest.mark.parametrize(
    "param,reply",
    [
        ("SIZE=10001", "552 5.3.4 Message size exceeds fixed maximum message size"),
        ("SIZE=x", "501 5.5.4 Bad SIZE parameter syntax"),
        ("SIZE=10000", "250 2.1.0 Ok"),
        ("BODY=8BITMIME", "250 2.1.0 Ok"),
        ("BODY=BINARYMIME", "501 5.5.4 Bad BODY parameter syntax"),
        ("RET=HDRS ENVID=abc+2Bdef", "250 2.1.0 Ok"),
        ("RET=ALL", "501 5.5.4 Bad RET parameter syntax"),
        ("ENVID=a+zz", "501 5.5.4 Bad ENVID parameter syntax"),
        ("SMTPUTF8=yes", "501 5.5.4 Bad SMTPUTF8 parameter syntax"),
        ("AUTH=<>", "555 5.5.4 Unsupported option: AUTH"),
        ("FOO", "555 5.5.4 Unsupported option: FOO"),
        ("SIZE=1 SIZE=2", "501 5.5.4 Duplicate SIZE parameter"),
    ],
)
def test_mail_parameters(param: str, reply: str) -> None:
    h = Harness.make(max_message_size=10_000)
    h.ehlo()
    assert h.feed(f"MAIL FROM:<s@sender.test> {param}\r\n".encode()) == [reply]


def test_mail_and_rcpt_parameters_kept_in_the_envelope() -> None:
    h = Harness()
    h.ehlo()
    h.feed(
        b"MAIL FROM:<s@sender.test> SIZE=10 BODY=8bitmime RET=hdrs ENVID=QQ314159\r\n"
        b"RCPT TO:<u@ours.test> NOTIFY=success,failure ORCPT=rfc822;u+40ours.test\r\n"
        b"RCPT TO:<v@ours.test> NOTIFY=NEVER\r\nDATA\r\nx\r\n.\r\n"
    )
    tx = h.stored[0].transaction
    assert (tx.params.size, tx.params.body_type, tx.params.ret, tx.params.envid) == (10, "8BITMIME", "HDRS", "QQ314159")
    assert tx.recipients[0].notify == ("SUCCESS", "FAILURE")
    assert tx.recipients[0].orcpt == "rfc822;u+40ours.test"
    assert tx.recipients[1].notify == ("NEVER",)


@pytest.mark.parametrize(
    "param,reply",
    [
        ("NOTIFY=NEVER,SUCCESS", "501 5.5.4 Bad NOTIFY parameter syntax"),
        ("NOTIFY=SOMETIMES", "501 5.5.4 Bad NOTIFY parameter syntax"),
        ("NOTIFY=SUCCESS,SUCCESS", "501 5.5.4 Bad NOTIFY parameter syntax"),
        ("ORCPT=rfc822", "501 5.5.4 Bad ORCPT parameter syntax"),
        ("ORCPT=;x@y", "501 5.5.4 Bad ORCPT parameter syntax"),
        ("FOO=bar", "555 5.5.4 Unsupported option: FOO"),
        ("NOTIFY=DELAY NOTIFY=DELAY", "501 5.5.4 Duplicate NOTIFY parameter"),
    ],
)
def test_rcpt_parameters_refused(param: str, reply: str) -> None:
    h = Harness()
    h.ehlo()
    h.feed(b"MAIL FROM:<s@sender.test>\r\n")
    assert h.feed(f"RCPT TO:<u@ours.test> {param}\r\n".encode()) == [reply]


def test_parameters_need_ehlo() -> None:
    h = Harness()
    h.feed(b"HELO c.test\r\n")
    assert h.feed(b"MAIL FROM:<s@sender.test> SIZE=10\r\n") == ["555 5.5.4 Unsupported option: SIZE"]


# --- paths: RELIABILITY.md #38/#39 and friends ------------------------------------------------------
@pytest.mark.parametrize(
    "path,reply",
    [
        ("<user>", "501 5.1.7 Bad sender address syntax"),
        ("<postmaster>", "501 5.1.7 Bad sender address syntax"),
        ("<u@@d.test>", "501 5.1.7 Bad sender address syntax"),
        ("<u(comment)@d.test>", "501 5.1.7 Bad sender address syntax"),
        ("<a\x01b@d.test>", "501 5.1.7 Bad sender address syntax"),
        ('<"a\rb"@d.test>', "501 5.1.7 Bad sender address syntax"),
        ("<u@d.test", "501 5.1.7 Bad sender address syntax"),
        ("u@d.test>", "501 5.1.7 Bad sender address syntax"),
        ("u@d.test", "501 5.1.7 Bad sender address syntax"),
        ("<<u@d.test>>", "501 5.1.7 Bad sender address syntax"),
        ("<u@d.test>x", "501 5.1.7 Bad sender address syntax"),
        ("<u..v@d.test>", "501 5.1.7 Bad sender address syntax"),
        ("<u@d.test.>", "501 5.1.7 Bad sender address syntax"),
        ("<u@-d.test>", "501 5.1.7 Bad sender address syntax"),
        ("<u @d.test>", "501 5.1.7 Bad sender address syntax"),
        ("<" + "a" * 65 + "@d.test>", "553 5.1.7 Sender address too long"),
        ("<" + "a" * 60 + "@" + "d" * 190 + ".test>", "553 5.1.7 Sender address too long"),
        ("<üser@d.test>", "553 5.6.7 Non-ASCII sender address requires SMTPUTF8"),
    ],
)
def test_bad_sender_paths(path: str, reply: str) -> None:
    h = Harness()
    h.ehlo()
    assert h.feed(f"MAIL FROM:{path}\r\n".encode()) == [reply]
    assert h.of(MailFrom) == []


@pytest.mark.parametrize(
    "path,reply",
    [
        ("<user>", "501 5.1.3 Bad recipient address syntax"),
        ("<>", "501 5.1.3 Bad recipient address syntax"),
        ("<u@@ours.test>", "501 5.1.3 Bad recipient address syntax"),
        ("<u(comment)@ours.test>", "501 5.1.3 Bad recipient address syntax"),
        ("<a\x01b@ours.test>", "501 5.1.3 Bad recipient address syntax"),
        ('<"a\rb"@ours.test>', "501 5.1.3 Bad recipient address syntax"),
        ("<u@ours.test", "501 5.1.3 Bad recipient address syntax"),
        ("u@ours.test", "501 5.1.3 Bad recipient address syntax"),
        ("<u@ours.test.>", "501 5.1.3 Bad recipient address syntax"),
        ("<u@[1.2.3.999]>", "501 5.1.3 Bad recipient address syntax"),
        ("<u@[IPv6:::zz]>", "501 5.1.3 Bad recipient address syntax"),
        ("<" + "a" * 65 + "@ours.test>", "553 5.1.3 Recipient address too long"),
        ("<" + "a" * 64 + "@" + ("d" * 60 + ".") * 3 + "ours.test>", "553 5.1.3 Recipient address too long"),
        ("<üser@ours.test>", "553 5.6.7 Non-ASCII recipient address requires SMTPUTF8"),
    ],
)
def test_bad_recipient_paths(path: str, reply: str) -> None:
    h = Harness()
    h.ehlo()
    h.feed(b"MAIL FROM:<s@sender.test>\r\n")
    assert h.feed(f"RCPT TO:{path}\r\n".encode()) == [reply]
    assert h.of(RcptTo) == []


def test_path_limits_are_inclusive() -> None:
    h = Harness()
    h.ehlo()
    h.feed(b"MAIL FROM:<s@sender.test>\r\n")
    local64 = "a" * 64
    assert h.feed(f"RCPT TO:<{local64}@ours.test>\r\n".encode()) == ["250 2.1.5 Ok"]
    domain = ("d" * 62 + ".") * 3 + "ours.test"  # path: 1 + 64 + 1 + 198 + 1 = 265 > 256
    assert h.feed(f"RCPT TO:<{local64}@{domain}>\r\n".encode()) == ["553 5.1.3 Recipient address too long"]


@pytest.mark.parametrize(
    "path,address",
    [
        ("<u@OURS.test>", "u@ours.test"),
        ("<Alice.Smith@Ours.Test>", "Alice.Smith@ours.test"),
        ("<@relay1.test,@relay2.test:u@ours.test>", "u@ours.test"),
        ("<@ours.test:u@evil.test>", "u@evil.test"),
        ('<"u@evil"@ours.test>', '"u@evil"@ours.test'),
        ('<"a b>c"@ours.test>', '"a b>c"@ours.test'),
        ("<u%evil.test@ours.test>", "u%evil.test@ours.test"),
        ("<evil.test!u@ours.test>", "evil.test!u@ours.test"),
        ("<u@[192.0.2.5]>", "u@[192.0.2.5]"),
        ("<u@[IPv6:2001:db8::1]>", "u@[ipv6:2001:db8::1]"),
        ("<Postmaster>", "Postmaster@ours.test"),
        (" <u@ours.test>", "u@ours.test"),
    ],
)
def test_good_recipient_paths(path: str, address: str) -> None:
    h = Harness.make(postmaster_domain="ours.test")
    h.ehlo()
    h.feed(b"MAIL FROM:<>\r\n")
    assert h.feed(f"RCPT TO:{path}\r\n".encode()) == ["250 2.1.5 Ok"]
    ev = h.of(RcptTo)[0]
    assert isinstance(ev, RcptTo) and ev.recipient.address == address


def test_null_sender_accepted() -> None:
    h = Harness()
    h.ehlo()
    assert h.feed(b"MAIL FROM:<>\r\n") == ["250 2.1.0 Ok"]
    ev = h.of(MailFrom)[0]
    assert isinstance(ev, MailFrom) and ev.sender == ""


def test_utf8_addresses_with_smtputf8() -> None:
    h = Harness()
    h.ehlo()
    assert h.feed("MAIL FROM:<José@sender.test> SMTPUTF8\r\n".encode()) == ["250 2.1.0 Ok"]
    assert h.feed("RCPT TO:<üser@ours.test>\r\n".encode()) == ["250 2.1.5 Ok"]
    h.feed(b"DATA\r\nx\r\n.\r\n")
    assert h.stored[0].transaction.params.smtputf8
    assert h.stored[0].transaction.recipients[0].address == "üser@ours.test"


def test_invalid_utf8_command_refused() -> None:
    h = Harness()
    h.ehlo()
    assert h.feed(b"MAIL FROM:<\xff@x.test>\r\n") == ["500 5.5.2 Error: command is not valid UTF-8"]


def test_mail_without_from_keyword() -> None:
    h = Harness()
    h.ehlo()
    assert h.feed(b"MAIL <s@x.test>\r\n") == ["501 5.5.4 Syntax: MAIL FROM:<address>"]
    h.feed(b"MAIL FROM:<s@x.test>\r\n")
    assert h.feed(b"RCPT <u@x.test>\r\n") == ["501 5.5.4 Syntax: RCPT TO:<address>"]


# --- sequence ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [b"MAIL FROM:<a@b.test>", b"RCPT TO:<a@b.test>", b"DATA", b"VRFY x", b"STARTTLS"])
def test_commands_before_helo(cmd: str) -> None:
    h = Harness.make(tls_available=True)
    assert h.feed(cmd + b"\r\n") == ["503 5.5.1 Error: send HELO/EHLO first"]


def test_sequence_errors() -> None:
    h = Harness()
    h.ehlo()
    assert h.feed(b"RCPT TO:<u@ours.test>\r\n") == ["503 5.5.1 Error: need MAIL command"]
    assert h.feed(b"DATA\r\n") == ["503 5.5.1 Error: need MAIL command"]
    h.feed(b"MAIL FROM:<s@x.test>\r\n")
    assert h.feed(b"MAIL FROM:<s@x.test>\r\n") == ["503 5.5.1 Error: nested MAIL command"]
    assert h.feed(b"DATA\r\n") == ["503 5.5.1 Error: need RCPT command"]
    assert h.feed(b"DATA x\r\n") == ["501 5.5.4 Syntax: DATA"]


def test_data_after_all_recipients_refused() -> None:
    h = Harness(rcpt_policy=lambda a: Reply(550, "5.1.1", f"<{a}>: User unknown"))
    h.ehlo()
    out = h.feed(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<nobody@ours.test>\r\nDATA\r\nbody\r\n.\r\n")
    assert out[:3] == [
        "250 2.1.0 Ok",
        "550 5.1.1 <nobody@ours.test>: User unknown",
        "554 5.5.1 Error: no valid recipients",
    ]
    assert h.stored == []


def test_simple_commands() -> None:
    h = Harness()
    assert h.feed(b"NOOP\r\n") == ["250 2.0.0 Ok"]
    assert h.feed(b"HELP\r\n")[0].startswith("214 2.0.0")
    h.ehlo()
    assert h.feed(b"VRFY alice\r\n") == ["252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"]
    assert h.feed(b"VRFY\r\n") == ["501 5.5.4 Syntax: VRFY address"]
    assert h.feed(b"noop with args\r\n") == ["250 2.0.0 Ok"]
    h.feed(b"MAIL FROM:<s@x.test>\r\n")
    assert h.feed(b"RSET\r\n") == ["250 2.0.0 Ok"]
    assert h.conn.transaction is None and h.conn.state is State.READY
    assert h.feed(b"RCPT TO:<u@ours.test>\r\n") == ["503 5.5.1 Error: need MAIL command"]
    assert h.feed(b"QUIT\r\nNOOP\r\n") == ["221 2.0.0 Bye"]
    assert h.conn.state is State.CLOSED


def test_ehlo_resets_transaction() -> None:
    h = Harness()
    h.ehlo()
    h.feed(b"MAIL FROM:<s@x.test>\r\n")
    h.ehlo()
    assert h.conn.transaction is None
    assert h.feed(b"MAIL FROM:<s@x.test>\r\n") == ["250 2.1.0 Ok"]


def test_unknown_and_unimplemented_commands_then_close_after_ten() -> None:
    h = Harness()
    assert h.feed(b"FOO\r\n") == ["500 5.5.1 Error: command not recognized"]
    assert h.feed(b"EXPN list\r\n") == ["502 5.5.1 Error: command not implemented"]
    assert h.feed(b"\r\n") == ["500 5.5.2 Error: bad syntax"]
    out = h.feed(b"BAR\r\n" * 10)
    assert out[-1].startswith("421 4.7.0")
    assert len(out) == 7  # errors 4..10; the 10th is answered with 421
    assert h.conn.state is State.CLOSED


def test_max_commands() -> None:
    h = Harness.make(max_commands=20)
    out = h.feed(b"NOOP\r\n" * 25)
    assert out[:20] == ["250 2.0.0 Ok"] * 20
    assert out[20].startswith("421 4.7.0") and len(out) == 21


def test_line_too_long_and_session_continues() -> None:
    h = Harness()
    h.ehlo()
    assert h.feed(b"NOOP " + b"x" * 505 + b"\r\n") == ["250 2.0.0 Ok"]  # 512 with CRLF
    assert h.feed(b"NOOP " + b"x" * 506 + b"\r\n") == ["500 5.5.2 Line too long"]
    # MAIL and RCPT may be longer (parameters), up to 1024
    assert h.feed(b"MAIL FROM:<s@x.test> ENVID=" + b"a" * 100 + b"\r\n") == ["250 2.1.0 Ok"]
    assert h.feed(b"RCPT TO:<u@ours.test> ORCPT=rfc822;" + b"a" * 990 + b"\r\n") == ["500 5.5.2 Line too long"]
    assert h.feed(b"NOOP\r\n") == ["250 2.0.0 Ok"]


def test_ten_megabyte_line_without_crlf_bounded_memory() -> None:
    h = Harness()
    h.ehlo()
    chunk = b"A" * 65536
    for _ in range(160):  # 10 MiB
        assert h.feed(chunk) == []
        assert h.conn.buffered <= 65536 + 1024
    assert h.feed(b"\r\nNOOP\r\n") == ["500 5.5.2 Line too long", "250 2.0.0 Ok"]


def test_too_many_recipients() -> None:
    h = Harness.make(max_recipients=100)
    h.ehlo()
    h.feed(b"MAIL FROM:<s@x.test>\r\n")
    out = h.feed(b"".join(b"RCPT TO:<u%d@ours.test>\r\n" % i for i in range(102)))
    assert out[:100] == ["250 2.1.5 Ok"] * 100
    assert out[100:] == ["452 4.5.3 Too many recipients"] * 2
    h.feed(b"DATA\r\nx\r\n.\r\n")
    assert len(h.stored[0].transaction.recipients) == 100
    assert h.conn.errors == 0  # not counted as protocol errors


# --- Received headers (hop count) ------------------------------------------------------------------
def _headers(n: int) -> bytes:
    return b"".join(b"Received: from h%d by h%d; date\r\n" % (i, i) for i in range(n))


@pytest.mark.parametrize("n,ok", [(50, True), (51, False)])
def test_hop_count(n: int, ok: bool) -> None:
    h = Harness()
    h.ehlo()
    out = h.feed(TX + _headers(n) + b"Subject: x\r\n\r\nReceived: in the body\r\n" * 3 + b".\r\n")
    assert (out[-1] == "250 2.0.0 Ok: queued as Q1") is ok
    if not ok:
        assert out[-1] == "554 5.4.6 Too many hops"


def test_hop_count_case_insensitive_across_chunk_boundaries() -> None:
    h = Harness.make(max_received_headers=3)
    h.ehlo()
    wire = TX + b"RECEIVED: a\r\nreceived: b\r\nReCeIvEd: c\r\nreceived: d\r\n\r\nbody\r\n.\r\n"
    for i in range(0, len(wire), 3):
        h.feed(wire[i : i + 3])
    assert h.replies[-1] == "554 5.4.6 Too many hops"
    d = h.of(DataRejected)
    assert len(d) == 1


def test_received_count_reported() -> None:
    h = Harness()
    h.ehlo()
    h.feed(TX + _headers(2) + b"\r\nReceived: body\r\n.\r\n")
    ev = h.of(DataComplete)[0]
    assert isinstance(ev, DataComplete) and ev.received_headers == 2


# --- STARTTLS -------------------------------------------------------------------------------------
def test_starttls_discards_pipelined_plaintext() -> None:
    h = Harness.make(tls_available=True)
    h.ehlo()
    out = h.feed(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@x.test>\r\n")
    assert out == ["220 2.0.0 Ready to start TLS"]
    assert len(h.of(StartTls)) == 1 and h.conn.state is State.TLS_PENDING
    h.conn.receive_data(b"NOOP\r\n")  # still plaintext before the handshake: dropped
    h.conn.tls_established()
    assert h.conn.next_event() is NEED_DATA
    assert h.feed(b"MAIL FROM:<s@x.test>\r\n") == ["503 5.5.1 Error: send HELO/EHLO first"]
    h.feed(b"EHLO c.test\r\n")
    assert "250-STARTTLS" not in h.replies[-8:] and "250 STARTTLS" not in h.replies[-8:]
    assert h.feed(b"STARTTLS\r\n") == ["503 5.5.1 Error: TLS already active"]
    assert h.of(MailFrom) == []


def test_starttls_refusals() -> None:
    h = Harness()
    h.ehlo()
    assert h.feed(b"STARTTLS\r\n") == ["502 5.5.1 Error: command not implemented"]
    t = Harness.make(tls_available=True)
    t.ehlo()
    t.feed(b"MAIL FROM:<s@x.test>\r\n")
    assert t.feed(b"STARTTLS\r\n") == ["503 5.5.1 Error: MAIL transaction in progress"]
    assert t.feed(b"STARTTLS now\r\n") == ["501 5.5.4 Syntax: STARTTLS"]


# --- HELO -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line,reply",
    [
        (b"HELO foo\rX-Injected: yes\r\n", "501 5.5.2 Invalid hostname"),
        (b"EHLO \x01bad\r\n", "501 5.5.2 Invalid hostname"),
        (b"EHLO\r\n", "501 5.5.4 Syntax: EHLO hostname"),
        (b"HELO\r\n", "501 5.5.4 Syntax: HELO hostname"),
    ],
)
def test_bad_helo(line: bytes, reply: str) -> None:
    h = Harness()
    assert h.feed(line) == [reply]
    assert h.conn.helo is None


def test_bare_lf_in_command_splits_the_line() -> None:
    h = Harness()
    out = h.feed(b"HELO foo\nX-Injected: yes\r\n")
    assert out == ["250 mx.test", "500 5.5.1 Error: command not recognized"]
    assert h.conn.helo == "foo"


# --- greeting and API misuse ----------------------------------------------------------------------
def test_talked_before_greeting() -> None:
    c = SmtpConnection(ProtocolConfig(hostname="mx.test"))
    c.receive_data(b"EHLO eager.test\r\n")
    assert c.greet(Reply(220, "", "mx.test ESMTP")) is False
    assert c.data_to_send() == b"554 5.5.1 Protocol error: talked before greeting\r\n"
    assert c.next_event() is CLOSED


def test_early_talk_tolerated_when_the_banner_was_not_held_back() -> None:
    c = SmtpConnection(ProtocolConfig(hostname="mx.test"))
    c.receive_data(b"EHLO fast.test\r\n")
    assert c.greet(Reply(220, "", "mx.test ESMTP"), reject_early_talkers=False) is True
    assert isinstance(c.next_event(), Hello)


def test_api_misuse_raises() -> None:
    c = SmtpConnection(ProtocolConfig(hostname="mx.test"))
    c.greet(Reply(220, "", "x"))
    with pytest.raises(ProtocolUsageError):
        c.accept()
    c.receive_data(b"EHLO a.test\r\n")
    c.next_event()
    with pytest.raises(ProtocolUsageError):
        c.next_event()
    with pytest.raises(ProtocolUsageError):
        c.tls_established()


def test_end_of_data_needs_explicit_reply_and_refusal_ends_transaction() -> None:
    c = SmtpConnection(ProtocolConfig(hostname="mx.test"))
    c.greet(Reply(220, "", "x"))
    c.receive_data(b"EHLO a.test\r\n" + TX + b"x\r\n.\r\n")
    while True:
        ev = c.next_event()
        if isinstance(ev, DataComplete):
            break
        if not isinstance(ev, type(ev)) or ev in (NEED_DATA, CLOSED):
            raise AssertionError(ev)
        if type(ev).__name__ in ("Hello", "MailFrom", "RcptTo", "DataRequested"):
            c.accept()
    with pytest.raises(ProtocolUsageError):
        c.accept()
    c.refuse(Reply(451, "4.3.0", "try later"))
    assert c.transaction is None and c.state is State.READY
    assert c.data_to_send().endswith(b"451 4.3.0 try later\r\n")


def test_repr_shows_the_state() -> None:
    h = Harness()
    h.ehlo()
    assert repr(h.conn) == "<SmtpConnection READY helo='client.test' tls=False pending=None buffered=0>"


def test_send_and_close() -> None:
    h = Harness()
    h.conn.send_and_close(Reply(421, "4.4.2", "mx.test Error: timeout exceeded"))
    assert h._collect() == ["421 4.4.2 mx.test Error: timeout exceeded"]
    assert h.conn.next_event() is CLOSED
    h.conn.receive_data(b"NOOP\r\n")
    assert h.conn.next_event() is CLOSED


# --- forbid_early_pipelining (Postfix's smtpd_forbid_unauth_pipelining) ----------------------------
SYNC = "554 5.5.0 Error: SMTP protocol synchronization"


@pytest.mark.parametrize(
    ("prelude", "payload", "verb"),
    [
        (b"", b"EHLO bot.test\r\nMAIL FROM:<a@b.test>\r\n", "EHLO"),
        (b"", b"HELO bot.test\r\nMAIL FROM:<a@b.test>\r\n", "HELO"),
        (b"", b"EHLO bot.test\r\n\r\n", "EHLO"),
        (b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@ours.test>\r\n", b"DATA\r\nSubject: early\r\n", "DATA"),
        (b"HELO c.test\r\n", b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@ours.test>\r\n", "MAIL"),
    ],
    ids=["ehlo+mail", "helo+mail", "ehlo+empty line", "data+content", "helo session: mail+rcpt"],
)
def test_early_pipelining_is_554_and_closed(prelude: bytes, payload: bytes, verb: str) -> None:
    h = Harness.make(forbid_early_pipelining=True)
    if prelude:
        for line in prelude.split(b"\r\n")[:-1]:
            h.feed(line + b"\r\n")  # one command at a time: allowed
    out = h.feed(payload)
    assert out[-1] == SYNC
    assert h.conn.state is State.CLOSED and h.stored == []
    rejected = [e for e in h.events if isinstance(e, Rejected)]
    assert rejected[-1].command == verb and rejected[-1].reply.code == 554
    assert "pipelined before our reply" in rejected[-1].argument


def test_pipelining_within_the_rules_is_fine_when_forbidding() -> None:
    h = Harness.make(forbid_early_pipelining=True)
    h.feed(b"EHLO c.test\r\n")
    # RFC 2920: MAIL, RCPT... DATA in one group; the content, the end and the next group in one write
    out = h.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@ours.test>\r\nRCPT TO:<v@ours.test>\r\nDATA\r\n")
    assert out == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    out = h.feed(b"one\r\n.\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@ours.test>\r\nDATA\r\n")
    assert out == ["250 2.0.0 Ok: queued as Q1", "250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert h.feed(b"two\r\n.\r\nQUIT\r\n") == ["250 2.0.0 Ok: queued as Q2", "221 2.0.0 Bye"]


def test_early_pipelining_allowed_when_not_forbidden() -> None:
    h = Harness.make(forbid_early_pipelining=False)
    out = h.feed(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@ours.test>\r\nDATA\r\nx\r\n.\r\n")
    assert out[-1] == "250 2.0.0 Ok: queued as Q1"
