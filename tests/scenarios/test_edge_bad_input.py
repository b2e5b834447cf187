"""Bad input against the real `backupmx serve`, over sockets: relay tricks, SMTP smuggling endings,
malformed paths, over-long lines, too many recipients, STARTTLS plaintext injection, HELO with CR/LF and
friends, sequence errors. Each case on a fresh connection, each with its exact reply, and nothing is ever
stored: no "queued" event in the mail log after any case, and `backupmx queue count` is 0 at the end.
The (input, reply) table is printed (run with -s to see it)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.scenarios.test_edge_client import EdgeClient, maillog_events, make_cert
from tests.support.serve import ServeProcess, free_port

BARE = "550 5.5.2 Message contains bare CR or LF"
NUL = "550 5.5.2 Message contains NUL character"
SYNC = "554 5.5.0 Error: SMTP protocol synchronization"
RELAY = "554 5.7.1 <{}>: Relay access denied"
BAD_RCPT = "501 5.1.3 Bad recipient address syntax"
BAD_SENDER = "501 5.1.7 Bad sender address syntax"
RCPT_OK = "250 2.1.5 Ok"
SMUGGLED = b"MAIL FROM:<spoof@evil.test>\r\nRCPT TO:<alice@ours.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled"


@dataclass(frozen=True)
class Case:
    group: str
    shown: str  # the input as shown in the table
    prelude: str  # "banner" | "ehlo" | "mail" | "data"
    payload: bytes
    expected: tuple[str, ...]  # the replies to the payload, in order
    closes: bool = False  # the server ends the session after the last reply


def rcpt(address: str) -> bytes:
    return f"RCPT TO:<{address}>\r\n".encode()


def smuggle(ending: bytes) -> bytes:
    return b"Subject: hello\r\n\r\nhello" + ending + SMUGGLED + b"\r\n.\r\n"


CASES: list[Case] = [
    # relay tricks: the domain after the last @ decides; %, ! and quotes are the primary's business
    Case("relay", "RCPT TO:<u%evil.test@ours.test>", "mail", rcpt("u%evil.test@ours.test"), (RCPT_OK,)),
    Case("relay", "RCPT TO:<evil.test!u@ours.test>", "mail", rcpt("evil.test!u@ours.test"), (RCPT_OK,)),
    Case(
        "relay",
        "RCPT TO:<@ours.test:u@evil.test>",
        "mail",
        rcpt("@ours.test:u@evil.test"),
        (RELAY.format("u@evil.test"),),
    ),
    Case("relay", 'RCPT TO:<"u@evil.test"@ours.test>', "mail", rcpt('"u@evil.test"@ours.test'), (RCPT_OK,)),
    Case("relay", "RCPT TO:<u@[203.0.113.5]>", "mail", rcpt("u@[203.0.113.5]"), (RELAY.format("u@[203.0.113.5]"),)),
    Case(
        "relay",
        "RCPT TO:<u@ours.test.evil.test>",
        "mail",
        rcpt("u@ours.test.evil.test"),
        (RELAY.format("u@ours.test.evil.test"),),
    ),
    Case("relay", "RCPT TO:<u@ours.test.>", "mail", rcpt("u@ours.test."), (BAD_RCPT,)),
    Case("relay", "RCPT TO:<u@evil.test>", "mail", rcpt("u@evil.test"), (RELAY.format("u@evil.test"),)),
    Case("relay", "RCPT TO:<u@OURS.TEST> (case)", "mail", rcpt("u@OURS.TEST"), (RCPT_OK,)),
    # smuggling: a fake end of data never ends anything; the whole message is refused at the real end
    *[
        Case(
            "smuggling",
            f"DATA ...{e!r} + MAIL/RCPT/DATA ... <CRLF>.<CRLF>",
            "data",
            smuggle(e),
            ("550 5.5.2 Message contains NUL character" if b"\x00" in e else BARE,),
        )
        for e in (b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r", b"\r\n\x00.\r\n", b"\r\r\n.\r\r\n")
    ],
    Case("smuggling", "DATA with a bare LF in a header", "data", b"Subject: a\nX: b\r\n\r\nbody\r\n.\r\n", (BARE,)),
    # the endings public scanners send since CVE-2023-51764/5/6 that the list above lacks: smtpsmug's
    # crlf, lfcr, crlflf and nullafter, and the NUL variants of other checkers (smtp_smuggling_checker)
    *[
        Case("smtpsmug", f"DATA ...{e!r} + MAIL/RCPT/DATA ... <CRLF>.<CRLF>", "data", smuggle(e), (reply,))
        for e, reply in (
            (b"\r.\n", BARE),
            (b"\n.\r", BARE),
            (b"\r\n.\n", BARE),
            (b"\n\n.\r\n", BARE),
            (b"\r\n.\x00\r\n", NUL),
            (b"\r\n\x00.\r", BARE),
            (b"\r\n\x00.\n", BARE),
        )
    ],
    # malformed paths
    Case("paths", "RCPT TO:<user>", "mail", rcpt("user"), (BAD_RCPT,)),
    Case("paths", "RCPT TO:<u@@ours.test>", "mail", rcpt("u@@ours.test"), (BAD_RCPT,)),
    Case("paths", "RCPT TO:<u(comment)@ours.test>", "mail", rcpt("u(comment)@ours.test"), (BAD_RCPT,)),
    Case("paths", "RCPT TO:<a\\x01b@ours.test>", "mail", rcpt("a\x01b@ours.test"), (BAD_RCPT,)),
    Case("paths", 'RCPT TO:<"a\\rb"@ours.test>', "mail", rcpt('"a\rb"@ours.test'), (BAD_RCPT,)),
    Case("paths", "RCPT TO:<u@ours.test (unbalanced)", "mail", b"RCPT TO:<u@ours.test\r\n", (BAD_RCPT,)),
    Case("paths", "RCPT TO:u@ours.test (no brackets)", "mail", b"RCPT TO:u@ours.test\r\n", (BAD_RCPT,)),
    Case("paths", "RCPT TO:<> ", "mail", rcpt(""), (BAD_RCPT,)),
    Case(
        "paths",
        "RCPT TO:<65-octet local part@ours.test>",
        "mail",
        rcpt("x" * 65 + "@ours.test"),
        ("553 5.1.3 Recipient address too long",),
    ),
    Case("paths", "MAIL FROM:<user>", "ehlo", b"MAIL FROM:<user>\r\n", (BAD_SENDER,)),
    Case("paths", "MAIL FROM:<u@@d.test>", "ehlo", b"MAIL FROM:<u@@d.test>\r\n", (BAD_SENDER,)),
    Case("paths", "MAIL FROM:<u(c)@d.test>", "ehlo", b"MAIL FROM:<u(c)@d.test>\r\n", (BAD_SENDER,)),
    Case(
        "paths",
        "MAIL FROM:<257-octet path>",
        "ehlo",
        b"MAIL FROM:<" + b"a" * 60 + b"@" + b"d" * 196 + b".t>\r\n",
        ("553 5.1.7 Sender address too long",),
    ),
    Case(
        "paths",
        "MAIL FROM:<ü@d.test> without SMTPUTF8",
        "ehlo",
        "MAIL FROM:<ü@d.test>\r\n".encode(),
        ("553 5.6.7 Non-ASCII sender address requires SMTPUTF8",),
    ),
    Case(
        "paths",
        "MAIL FROM:<a@d.test> SIZE=999999999999",
        "ehlo",
        b"MAIL FROM:<a@d.test> SIZE=999999999999\r\n",
        ("552 5.3.4 Message size exceeds fixed maximum message size",),
    ),
    Case(
        "paths",
        "MAIL FROM:<a@d.test> FOO=bar",
        "ehlo",
        b"MAIL FROM:<a@d.test> FOO=bar\r\n",
        ("555 5.5.4 Unsupported option: FOO",),
    ),
    # over-long lines: memory stays bounded and the session goes on
    Case(
        "long lines",
        "NOOP + 600 octets",
        "ehlo",
        b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n",
        ("500 5.5.2 Line too long", "250 2.0.0 Ok"),
    ),
    Case(
        "long lines",
        "10 MB without CRLF, then CRLF, NOOP",
        "ehlo",
        b"x" * 10_000_000 + b"\r\nNOOP\r\n",
        ("500 5.5.2 Line too long", "250 2.0.0 Ok"),
    ),
    Case(
        "long lines",
        "RCPT TO:<...> + 1100 octets",
        "mail",
        b"RCPT TO:<a@ours.test>" + b" " * 1100 + b"\r\n",
        ("500 5.5.2 Line too long",),
    ),
    Case(
        "long lines",
        "non-UTF-8 bytes in a command",
        "ehlo",
        b"NOOP \xff\xfe\r\n",
        ("500 5.5.2 Error: command is not valid UTF-8",),
    ),
    # HELO/EHLO with CR, LF and other control characters: never a second line in a header
    Case("helo", "EHLO a<CR>b", "banner", b"EHLO a\rb\r\n", ("501 5.5.2 Invalid hostname",)),
    Case("helo", "EHLO a<NUL>b", "banner", b"EHLO a\x00b\r\n", ("501 5.5.2 Invalid hostname",)),
    Case("helo", "EHLO a<TAB>b", "banner", b"EHLO a\tb\r\n", ("501 5.5.2 Invalid hostname",)),
    # (a second line sent before our reply to HELO is early pipelining: forbid_early_pipelining's 554)
    Case("helo", "HELO a<LF>X-Injected: yes", "banner", b"HELO a\nX-Injected: yes\r\n", (SYNC,), closes=True),
    Case("helo", "HELO a<CRLF><SP>X-Injected: yes", "banner", b"HELO a\r\n X-Injected: yes\r\n", (SYNC,), closes=True),
    Case("helo", "EHLO (empty)", "banner", b"EHLO\r\n", ("501 5.5.4 Syntax: EHLO hostname",)),
    # sequence errors
    Case(
        "sequence",
        "MAIL before EHLO",
        "banner",
        b"MAIL FROM:<a@d.test>\r\n",
        ("503 5.5.1 Error: send HELO/EHLO first",),
    ),
    Case("sequence", "RCPT before MAIL", "ehlo", rcpt("alice@ours.test"), ("503 5.5.1 Error: need MAIL command",)),
    Case("sequence", "DATA before RCPT", "mail", b"DATA\r\n", ("503 5.5.1 Error: need RCPT command",)),
    Case(
        "sequence",
        "DATA after refused RCPTs",
        "mail",
        rcpt("u@evil.test") + b"DATA\r\n",
        (RELAY.format("u@evil.test"), "554 5.5.1 Error: no valid recipients"),
    ),
    Case("sequence", "MAIL twice", "mail", b"MAIL FROM:<b@d.test>\r\n", ("503 5.5.1 Error: nested MAIL command",)),
    Case(
        "sequence",
        "AUTH (not offered on an MX)",
        "ehlo",
        b"AUTH PLAIN AGFiYwB4eXo=\r\n",
        ("502 5.5.1 Error: command not implemented",),
    ),
    Case("sequence", "BDAT (not offered)", "mail", b"BDAT 10 LAST\r\n", ("502 5.5.1 Error: command not implemented",)),
]

TABLE: list[tuple[str, str, str]] = []


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    base = tmp_path_factory.mktemp("edge_bad")
    cert, key = make_cert(base / "tls")
    node = ServeProcess(
        base / "node",
        domains=[{"name": "ours.test", "primary": [f"127.0.0.1:{free_port()}"], "recipients": "any"}],
        server={"max_recipients": 100, "tls_cert": str(cert), "tls_key": str(key)},
    )
    node.start()
    yield node
    node.kill()
    if TABLE:
        width = max(len(i) for _, i, _ in TABLE)
        print("\n\nbad input against backupmx serve (nothing stored after any of them):")
        print(f"{'group':11s} {'input':{width}s}  reply")
        for group, shown, reply in TABLE:
            print(f"{group:11s} {shown:{width}s}  {reply}")


def open_client(serve: ServeProcess, prelude: str) -> EdgeClient:
    c = EdgeClient(serve.port)
    assert c.banner.startswith("220 backup.test")
    if prelude in ("ehlo", "mail", "data"):
        assert c.cmd("EHLO client.test").startswith("250 ")
    if prelude in ("mail", "data"):
        assert c.cmd("MAIL FROM:<s@sender.test>") == "250 2.1.0 Ok"
    if prelude == "data":
        assert c.cmd("RCPT TO:<alice@ours.test>") == RCPT_OK
        assert c.cmd("DATA").startswith("354 ")
    return c


def nothing_stored(serve: ServeProcess) -> None:
    assert maillog_events(serve.log(), "queued") == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.group}:{c.shown}")
def test_bad_input(serve: ServeProcess, case: Case) -> None:
    with open_client(serve, case.prelude) as c:
        c.send(case.payload)
        replies = tuple(c.reply() for _ in case.expected)
        assert replies == case.expected
        if case.closes:
            assert c.closed()
        else:
            # the session is still in order afterwards: nothing smuggled produced a reply of its own
            after = c.cmd("RSET")
            assert after in ("250 2.0.0 Ok",), after
            assert c.cmd("QUIT") == "221 2.0.0 Bye"
    TABLE.append((case.group, case.shown, " / ".join(replies)))
    nothing_stored(serve)


def test_too_many_recipients(serve: ServeProcess) -> None:
    with open_client(serve, "mail") as c:
        c.send(b"".join(rcpt(f"u{i}@ours.test") for i in range(101)))
        replies = [c.reply() for _ in range(101)]
        assert replies[:100] == [RCPT_OK] * 100
        assert replies[100] == "452 4.5.3 Too many recipients"
        assert c.cmd("RSET") == "250 2.0.0 Ok"
    TABLE.append(
        (
            "limits",
            "101 pipelined RCPTs (max_recipients = 100)",
            f"1-100: {RCPT_OK} / 101: 452 4.5.3 Too many recipients",
        )
    )
    nothing_stored(serve)


def starttls_injection(serve: ServeProcess, injected: bytes) -> list[str]:
    with open_client(serve, "ehlo") as c:
        c.send(b"STARTTLS\r\n" + injected)
        go = c.reply()
        assert go == "220 2.0.0 Ready to start TLS"
        c.starttls()
        first = c.cmd("MAIL FROM:<a@d.test>")  # an injected command would have been answered first
        c.send(b"EHLO client.test\r\n")
        ehlo = c.reply_lines()
        assert not any("STARTTLS" in line for line in ehlo)
        return [go, first, ehlo[-1]]


@pytest.mark.parametrize(
    "injected", [b"RSET\r\n", b"MAIL FROM:<spoof@evil.test>\r\nRCPT TO:<alice@ours.test>\r\n", b"EHLO evil.test\r\n"]
)
def test_starttls_plaintext_injection(serve: ServeProcess, injected: bytes) -> None:
    replies = starttls_injection(serve, injected)
    assert replies[1] == "503 5.5.1 Error: send HELO/EHLO first"  # fresh state: the injection was dropped
    TABLE.append(
        (
            "starttls",
            f"STARTTLS<CRLF>{injected.decode().replace(chr(13) + chr(10), '<CRLF>')}",
            f"{replies[0]}; after the handshake MAIL: {replies[1]}",
        )
    )
    nothing_stored(serve)


def test_zz_queue_is_empty(serve: ServeProcess) -> None:
    """Last (by name): after every case above, nothing is in the queue."""
    assert serve.queue_count() == 0
    assert serve.alive()
    nothing_stored(serve)


def cases_cover(groups: Callable[[str], bool]) -> int:
    return sum(1 for c in CASES if groups(c.group))


def test_every_group_is_there() -> None:
    assert cases_cover(lambda g: g == "relay") >= 7
    assert cases_cover(lambda g: g == "smuggling") >= 7
    assert cases_cover(lambda g: g == "smtpsmug") >= 7
    assert cases_cover(lambda g: g == "paths") >= 7
    assert cases_cover(lambda g: g == "helo") >= 4
