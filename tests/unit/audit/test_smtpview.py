"""The audit's SMTP client against scripted servers that misbehave in one way each: what it records,
that every step is bounded by the timeout, and that it leaves with RSET and QUIT when it can."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest

from backupmx.audit.report import Level, Role, SmtpProbe
from backupmx.audit.rules import smtp_marks
from backupmx.audit.smtpview import _reply, probe, probe_settings
from backupmx.reply import Reply

Responder = Callable[[str], "str | None"]  # a command line -> the reply text to send, or None to hang up


def standard(line: str) -> str | None:
    verb = line.split(" ", 1)[0].upper()
    if verb == "EHLO":
        return "250-odd.test\r\n250-PIPELINING\r\n250 8BITMIME"
    if verb == "MAIL":
        return "250 2.1.0 Ok"
    if verb == "RCPT":
        if "@example.net" in line:
            return "554 5.7.1 Relay access denied"
        return "250 2.1.5 Ok" if "postmaster@" in line.lower() else "550 5.1.1 No such user"
    if verb == "RSET":
        return "250 2.0.0 Ok"
    if verb == "QUIT":
        return "221 2.0.0 Bye"
    return "502 5.5.2 Command not recognized"


class Scripted:
    """An SMTP server on 127.0.0.1 that answers through `respond`; records every command line."""

    def __init__(self, respond: Responder = standard, banner: str | None = "220 odd.test ESMTP") -> None:
        self.respond, self.banner = respond, banner
        self.lines: list[str] = []
        self.sessions = 0
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.sessions += 1
        try:
            if self.banner is None:
                await asyncio.sleep(60)  # never greets; the client's timeout must end this
                return
            writer.write(self.banner.encode() + b"\r\n")
            for _ in range(100):
                raw = await reader.readline()
                if not raw:
                    return
                line = raw.decode().rstrip("\r\n")
                self.lines.append(line)
                answer = self.respond(line)
                if answer is None:
                    return
                writer.write(answer.encode() + b"\r\n")
                await writer.drain()
                if line.upper() == "QUIT":
                    return
        finally:
            writer.close()
            self._tasks.discard(task)


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Scripted]]:
    made: list[Scripted] = []

    def make(respond: Responder = standard, banner: str | None = "220 odd.test ESMTP") -> Scripted:
        s = Scripted(respond, banner)
        made.append(s)
        return s

    yield make
    for s in made:
        if s.server is not None:
            s.server.close()


async def run(server: Scripted, *, timeout: float = 2.0, role: Role = Role.BACKUP) -> SmtpProbe:
    settings = probe_settings("example.test", port=server.port, helo="checker.test", timeout=timeout)
    return await probe("mx.example.test", "127.0.0.1", role, settings)


def problems(p: SmtpProbe) -> set[tuple[str, Level]]:
    return {(m.check, m.level) for m in smtp_marks(p, datetime.now(UTC)) if m.level is not Level.OK}


def verbs(server: Scripted) -> list[str]:
    return [line.split(" ", 1)[0].upper() for line in server.lines]


async def test_plain_server_without_starttls(scripted: Callable[..., Scripted]) -> None:
    async with scripted() as s:
        p = await run(s)
    assert problems(p) == {("smtp.starttls", Level.FAIL)}
    assert verbs(s) == ["EHLO", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "RSET", "QUIT"]
    assert s.lines[1] == "MAIL FROM:<>" and s.lines[0] == "EHLO checker.test"
    assert p.extensions == ("PIPELINING", "8BITMIME")


async def test_greeting_that_refuses(scripted: Callable[..., Scripted]) -> None:
    async with scripted(banner="554 5.7.1 No SMTP service here") as s:
        p = await run(s)
    assert problems(p) == {("smtp.connect", Level.FAIL)}
    assert verbs(s) == ["RSET", "QUIT"]


async def test_server_that_never_greets_is_bounded_by_the_timeout(scripted: Callable[..., Scripted]) -> None:
    async with scripted(banner=None) as s:
        t0 = time.monotonic()
        p = await run(s, timeout=0.5)
        elapsed = time.monotonic() - t0
    assert problems(p) == {("smtp.connect", Level.FAIL)}
    assert p.error == "no reply within 0.5s"
    assert elapsed < 2


async def test_ehlo_refused(scripted: Callable[..., Scripted]) -> None:
    async with scripted(lambda line: "502 5.5.1 No" if line.startswith("EHLO") else standard(line)) as s:
        p = await run(s)
    assert problems(p) == {("smtp.ehlo", Level.FAIL)}
    assert verbs(s) == ["EHLO", "RSET", "QUIT"]


async def test_starttls_offered_but_refused(scripted: Callable[..., Scripted]) -> None:
    def respond(line: str) -> str | None:
        if line.startswith("EHLO"):
            return "250-odd.test\r\n250 STARTTLS"
        if line == "STARTTLS":
            return "454 4.7.0 TLS not available due to local problem"
        return standard(line)

    async with scripted(respond) as s:
        p = await run(s)
    assert problems(p) == {("smtp.starttls", Level.FAIL)}
    assert p.rcpt("postmaster") is not None  # the RCPT tests went on in clear text


async def test_tls_handshake_failure_falls_back_to_clear_text(scripted: Callable[..., Scripted]) -> None:
    def respond(line: str) -> str | None:
        if line.startswith("EHLO"):
            return "250-odd.test\r\n250 STARTTLS"
        if line == "STARTTLS":
            return "220 2.0.0 Ready\r\nthis is not TLS at all\r\n"
        return standard(line)

    async with scripted(respond) as s:
        p = await run(s)
    assert problems(p) == {("smtp.starttls", Level.FAIL)}
    assert p.tls is None and p.tls_error
    assert s.sessions == 2 and verbs(s)[-1] == "QUIT"
    assert [t.reply.code if t.reply else None for t in p.rcpts] == [250, 550, 554]


async def test_null_sender_refused_then_a_neutral_sender(scripted: Callable[..., Scripted]) -> None:
    def respond(line: str) -> str | None:
        return "550 5.7.1 No bounces here" if line == "MAIL FROM:<>" else standard(line)

    async with scripted(respond) as s:
        p = await run(s)
    assert problems(p) == {("smtp.null-sender", Level.FAIL), ("smtp.starttls", Level.FAIL)}
    assert "MAIL FROM:<check@checker.test>" in s.lines
    assert {t.mail_from for t in p.rcpts} == {"check@checker.test"}


async def test_connection_dropped_mid_session(scripted: Callable[..., Scripted]) -> None:
    def respond(line: str) -> str | None:
        return None if "no-such-user" in line else standard(line)

    async with scripted(respond) as s:
        p = await run(s)
    assert problems(p) == {("smtp.session", Level.FAIL), ("smtp.starttls", Level.FAIL)}
    assert p.error == "connection closed by the server"


async def test_garbage_instead_of_a_reply(scripted: Callable[..., Scripted]) -> None:
    async with scripted(lambda line: "hello there" if line.startswith("EHLO") else standard(line)) as s:
        p = await run(s)
    assert p.error is not None and p.error.startswith("not an SMTP reply")
    assert problems(p) == {("smtp.session", Level.FAIL)}


async def test_connection_refused() -> None:
    settings = probe_settings("example.test", port=1, helo="checker.test", timeout=1)
    p = await probe("mx.example.test", "127.0.0.1", Role.PRIMARY, settings)
    assert p.error == "connect: Connection refused"
    assert problems(p) == {("smtp.connect", Level.FAIL)}


@pytest.mark.parametrize(
    ("code", "lines", "expected"),
    [
        (250, ["2.1.5 Ok"], Reply(250, "2.1.5", "Ok")),
        (250, ["mx.example.test", "PIPELINING", "8BITMIME"], Reply(250, "", "mx.example.test\nPIPELINING\n8BITMIME")),
        (
            550,
            ["5.1.1 <x@y>: Recipient address rejected:", "5.1.1 User unknown"],
            Reply(550, "5.1.1", "<x@y>: Recipient address rejected:\nUser unknown"),
        ),
        (220, [""], Reply(220, "", "")),
        (554, ["5.7.1"], Reply(554, "5.7.1", "")),
        (250, ["1.2.3 not a status"], Reply(250, "", "1.2.3 not a status")),
    ],
)
def test_reply_parsing(code: int, lines: list[str], expected: Reply) -> None:
    assert _reply(code, lines) == expected


def test_foreign_domain_is_never_the_checked_one() -> None:
    for domain in ("example.net", "mail.example.net", "example.org"):
        s = probe_settings(domain, port=25, helo="h", timeout=1)
        rcpt_domain = s.foreign_rcpt.rpartition("@")[2]
        assert rcpt_domain != domain and not domain.endswith("." + rcpt_domain)
