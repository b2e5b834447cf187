"""Talks SMTP to one address of one MX host, the way a sender would, without ever sending mail.

The session: banner, EHLO, STARTTLS when offered (verifying the certificate against the trust store
and the MX name), EHLO again, then three transactions, each `MAIL FROM:<>`, one RCPT, `RSET`:
postmaster@DOMAIN, a random local part at DOMAIN, an address at a foreign domain. The session ends with
`RSET` and `QUIT`; DATA is never sent. When the certificate does not verify, that handshake is given up
(as a verifying sender would) and a second session continues without verification, so the certificate
can still be shown and the recipient tests still run.

A small client of our own rather than aiosmtplib: the audit needs every raw reply, no automatic EHLO or
STARTTLS, and the TLS object itself. Network and protocol errors end the probe as values (`error`,
`tls_error`), never as exceptions; every read and write is bounded by the timeout.
"""

from __future__ import annotations

import _ssl  # ENCODING_DER for the private chain objects of Python < 3.13
import asyncio
import errno
import os
import secrets
import ssl
from dataclasses import dataclass, field

from backupmx.audit.views import RcptTest, Role, SmtpProbe, TlsInfo
from backupmx.audit.x509 import parse_certificate
from backupmx.reply import Reply

MAX_REPLY_LINES = 100
MAX_LINE = 4096  # RFC 5321 allows 512 per reply line; be generous, but bounded
FOREIGN_DOMAINS = ("example.net", "example.org", "example.com")  # RFC 2606: nobody can legitimately serve them


class _Lost(Exception):
    """The session cannot go on (connection lost, timeout, garbage); the message says where."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    domain: str
    port: int
    helo: str  # our EHLO name
    timeout: float  # per read, write, connect and handshake
    verify_context: ssl.SSLContext
    unknown_local_part: str  # shared by all probes of one run, so the report reads the same everywhere
    foreign_rcpt: str


def probe_settings(domain: str, *, port: int, helo: str, timeout: float, cafile: str | None = None) -> ProbeSettings:
    foreign = next(
        d for d in FOREIGN_DOMAINS if d != domain and not domain.endswith("." + d) and not d.endswith("." + domain)
    )
    return ProbeSettings(
        domain=domain,
        port=port,
        helo=helo,
        timeout=timeout,
        verify_context=verifying_context(cafile),
        unknown_local_part=f"no-such-user-{secrets.token_hex(6)}",
        foreign_rcpt=f"backupmx-relay-test@{foreign}",
    )


def verifying_context(cafile: str | None) -> ssl.SSLContext:
    """The system trust store, or only `cafile` when given; the MX name is checked."""
    return ssl.create_default_context(cafile=cafile)


def _unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class _Draft:
    """A probe while it is being filled in; `freeze()` makes the value."""

    host: str
    address: str
    port: int
    role: Role
    skipped: str | None = None
    error: str | None = None
    banner: Reply | None = None
    ehlo: Reply | None = None
    ehlo_tls: Reply | None = None
    starttls_offered: bool = False
    starttls: Reply | None = None
    tls: TlsInfo | None = None
    tls_error: str | None = None
    null_sender_refused: Reply | None = None
    rcpts: list[RcptTest] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)
    sessions: list[_Session] = field(default_factory=list)  # every connection opened, closed at the end

    def freeze(self) -> SmtpProbe:
        return SmtpProbe(
            host=self.host,
            address=self.address,
            port=self.port,
            role=self.role,
            skipped=self.skipped,
            error=self.error,
            banner=self.banner,
            ehlo=self.ehlo,
            ehlo_tls=self.ehlo_tls,
            starttls_offered=self.starttls_offered,
            starttls=self.starttls,
            tls=self.tls,
            tls_error=self.tls_error,
            null_sender_refused=self.null_sender_refused,
            rcpts=tuple(self.rcpts),
            transcript=tuple(self.transcript),
        )


class _Session:
    """One TCP connection speaking SMTP; every step bounded by `timeout`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float, transcript: list[str]
    ) -> None:
        self.reader, self.writer, self.timeout, self.transcript = reader, writer, timeout, transcript
        self.last_command = ""
        self.closed = False

    @classmethod
    async def open(cls, address: str, port: int, timeout: float, transcript: list[str]) -> _Session:
        transcript.append(f"-- connect {address} port {port}")
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address, port, limit=MAX_LINE)
        return cls(reader, writer, timeout, transcript)

    async def reply(self) -> Reply:
        lines: list[str] = []
        code = ""
        try:
            async with asyncio.timeout(self.timeout):
                for _ in range(MAX_REPLY_LINES):
                    raw = await self.reader.readline()
                    if not raw:
                        raise _Lost("connection closed by the server")
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    self.transcript.append(f"S: {line}")
                    if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
                        raise _Lost(f"not an SMTP reply: {line[:80]!r}")
                    if code and line[:3] != code:
                        raise _Lost("reply lines with different codes")
                    code = line[:3]
                    lines.append(line[4:])
                    if len(line) == 3 or line[3] == " ":
                        return _reply(int(code), lines)
                raise _Lost(f"reply longer than {MAX_REPLY_LINES} lines")
        except TimeoutError:
            raise _Lost(f"no reply within {self.timeout:g}s") from None
        except ValueError:  # a line longer than the stream limit
            raise _Lost(f"reply line longer than {MAX_LINE} bytes") from None
        except OSError as e:
            raise _Lost(_os_error(e)) from None

    async def command(self, line: str) -> Reply:
        self.transcript.append(f"C: {line}")
        self.last_command = line.split(" ", 1)[0].upper()
        try:
            self.writer.write(line.encode("ascii") + b"\r\n")
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        except TimeoutError:
            raise _Lost(f"could not send within {self.timeout:g}s") from None
        except OSError as e:
            raise _Lost(_os_error(e)) from None
        return await self.reply()

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """Raises ssl.SSLCertVerificationError (untrusted), _Lost (any other handshake failure)."""
        try:
            await self.writer.start_tls(context, server_hostname=server_hostname, ssl_handshake_timeout=self.timeout)
        except ssl.SSLCertVerificationError:
            raise
        except TimeoutError:
            raise _Lost(f"TLS handshake did not finish within {self.timeout:g}s") from None
        except (ssl.SSLError, OSError, ConnectionError) as e:
            raise _Lost(f"TLS handshake failed: {_os_error(e)}") from None

    def tls_info(self, verified: bool, verify_error: str | None) -> TlsInfo:
        obj = self.writer.get_extra_info("ssl_object")
        if obj is None:
            return TlsInfo("?", "?", None, verified, verify_error)
        der = obj.getpeercert(binary_form=True)
        cert = None
        if der:
            try:
                cert = parse_certificate(der)
            except ValueError:
                cert = None
        cipher = obj.cipher()
        return TlsInfo(
            obj.version() or "?", cipher[0] if cipher else "?", cert, verified, verify_error, presented_chain(obj, der)
        )

    async def close(self, transcript_note: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if transcript_note:
            self.transcript.append(f"-- {transcript_note}")
        self.writer.close()
        try:
            async with asyncio.timeout(self.timeout):
                await self.writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError):
            pass


def presented_chain(obj: ssl.SSLObject, leaf: bytes | None) -> tuple[bytes, ...]:
    """Every certificate the peer sent, DER, its own first. Python 3.13 has `get_unverified_chain()`;
    3.10 to 3.12 have the same method only on the private `_sslobj`; without either, the leaf alone."""
    getter = getattr(obj, "get_unverified_chain", None) or getattr(
        getattr(obj, "_sslobj", None), "get_unverified_chain", None
    )
    if getter is not None:
        try:
            chain = getter() or []
            return tuple(c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in chain)
        except (ssl.SSLError, ValueError, AttributeError):
            pass  # fall back to the leaf: DANE-EE still works, DANE-TA then finds no match
    return (leaf,) if leaf else ()


def _reply(code: int, lines: list[str]) -> Reply:
    """Lines without their "250-" prefix -> Reply; the enhanced status code is taken off every line."""
    first = lines[0] if lines else ""
    status, _, _ = first.partition(" ")
    if status.count(".") == 2 and status[:1] in "245" and all(p.isdigit() for p in status.split(".")):
        lines = [ln[len(status) + 1 :] if ln.startswith(status + " ") else ("" if ln == status else ln) for ln in lines]
        return Reply(code, status, "\n".join(lines))
    return Reply(code, "", "\n".join(lines))


def _os_error(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)  # asyncio's own text ("Connect call failed ...") says less
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


async def probe(host: str, address: str, role: Role, settings: ProbeSettings) -> SmtpProbe:
    """Everything one sender would see at `address` (one of `host`'s), as a value."""
    draft = _Draft(host, address, settings.port, role)
    try:
        await _run(draft, settings)
    except _Lost as e:
        draft.error = str(e)
    return draft.freeze()


_NO_ROUTE = frozenset({errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.EHOSTUNREACH, errno.EAFNOSUPPORT})


async def _connect(draft: _Draft, settings: ProbeSettings) -> _Session:
    try:
        session = await _Session.open(draft.address, settings.port, settings.timeout, draft.transcript)
    except TimeoutError:
        raise _Lost(f"connect: no answer within {settings.timeout:g}s") from None
    except OSError as e:
        raise _Lost(f"connect: {_os_error(e)}", e.errno) from None
    draft.sessions.append(session)
    return session


async def _greet(session: _Session, draft: _Draft, settings: ProbeSettings) -> bool:
    """Banner and EHLO; False (after QUIT) when the server does not want to talk."""
    draft.banner = await session.reply()
    if not draft.banner.is_positive:
        await _quit(session)
        return False
    draft.ehlo = await session.command(f"EHLO {settings.helo}")
    if not draft.ehlo.is_positive:
        await _quit(session)
        return False
    return True


async def _run(draft: _Draft, settings: ProbeSettings) -> None:
    try:
        session = await _connect(draft, settings)
    except _Lost as e:
        if ":" in draft.address and e.errno in _NO_ROUTE:
            draft.skipped = f"no IPv6 route from here ({str(e).removeprefix('connect: ')})"
            return
        raise
    try:
        if not await _greet(session, draft, settings):
            return
        draft.starttls_offered = "STARTTLS" in draft.freeze().extensions
        if draft.starttls_offered:
            session = await _starttls(session, draft, settings)
        await _rcpt_tests(session, draft, settings)
        await _quit(session)
    finally:
        for opened in draft.sessions:
            await opened.close()


async def _starttls(session: _Session, draft: _Draft, settings: ProbeSettings) -> _Session:
    """TLS on `session`, or on a second session when the first handshake is given up. Returns the session
    to go on with (plaintext when TLS failed for another reason than trust, as senders fall back)."""
    draft.starttls = await session.command("STARTTLS")
    if draft.starttls.code != 220:
        return session
    try:
        await session.start_tls(settings.verify_context, draft.host)
        draft.tls = session.tls_info(True, None)
    except ssl.SSLCertVerificationError as e:
        reason = e.verify_message or _os_error(e)
        await session.close(
            f"certificate not verified ({reason}): handshake given up; a new session without verification"
        )
        session = await _connect(draft, settings)
        if not await _greet(session, draft, settings):
            raise _Lost("the second session was refused") from None
        if (await session.command("STARTTLS")).code != 220:
            raise _Lost("STARTTLS refused in the second session") from None
        try:
            await session.start_tls(_unverified_context(), draft.host)
        except ssl.SSLCertVerificationError as e2:  # cannot happen without verification; be explicit
            raise _Lost(f"TLS handshake failed: {e2.verify_message}") from None
        except _Lost as lost:
            return await _after_tls_failure(session, draft, settings, str(lost))
        draft.tls = session.tls_info(False, reason)
    except _Lost as lost:
        return await _after_tls_failure(session, draft, settings, str(lost))
    draft.ehlo_tls = await session.command(f"EHLO {settings.helo}")
    if not draft.ehlo_tls.is_positive:
        raise _Lost(f"EHLO after STARTTLS refused: {draft.ehlo_tls}")
    return session


async def _after_tls_failure(session: _Session, draft: _Draft, settings: ProbeSettings, why: str) -> _Session:
    draft.tls_error = why.removeprefix("TLS handshake failed: ")
    await session.close("TLS failed: new plaintext session, as senders fall back")
    session = await _connect(draft, settings)
    if not await _greet(session, draft, settings):
        raise _Lost("the plaintext session after the TLS failure was refused")
    return session


async def _rcpt_tests(session: _Session, draft: _Draft, settings: ProbeSettings) -> None:
    tests = (
        ("postmaster", f"postmaster@{settings.domain}"),
        ("unknown", f"{settings.unknown_local_part}@{settings.domain}"),
        ("relay", settings.foreign_rcpt),
    )
    sender = ""
    for kind, rcpt in tests:
        mail = await session.command(f"MAIL FROM:<{sender}>")
        if sender == "" and mail.is_permanent:
            # refusing the null sender is itself a finding; go on with a neutral address of ours
            draft.null_sender_refused = mail
            await session.command("RSET")
            sender = f"check@{settings.helo}"
            mail = await session.command(f"MAIL FROM:<{sender}>")
        if not mail.is_positive:
            draft.rcpts.append(RcptTest(kind, sender, rcpt, mail, None))
            await session.command("RSET")
            continue
        reply = await session.command(f"RCPT TO:<{rcpt}>")
        draft.rcpts.append(RcptTest(kind, sender, rcpt, mail, reply))
        await session.command("RSET")


async def _quit(session: _Session) -> None:
    if session.last_command != "RSET":
        await session.command("RSET")
    await session.command("QUIT")
