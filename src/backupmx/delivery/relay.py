"""The SMTP client that hands a stored message to a primary: one session per connection, several
transactions per session, one Outcome per recipient (Delivered | Deferred | Bounced, each carrying
the primary's reply).

Built on aiosmtplib's connect/ehlo/starttls/mail/rcpt (never `sendmail`, which gives every recipient
the same RCPT options and fails as a whole); DATA is our own (see `_data`). Foreign exceptions are
mapped here, once: a refused or dropped connection, a timeout or any error we do not know is Deferred,
never Bounced. Only a 5xx from the primary (or its missing SMTPUTF8 for an SMTPUTF8 message) bounces.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.email import quote_address

from backupmx.config import Config
from backupmx.delivery.pipelining import GroupReplies, write_group
from backupmx.delivery.route import Target
from backupmx.model import Bounced, Deferred, Delivered, Envelope, Outcome, RecipientRecord
from backupmx.reply import Reply, readable

log = logging.getLogger(__name__)

CHUNK = 64 * 1024  # one write to the primary, then wait for the kernel to take it
BODY_CHUNK = 256 * 1024  # one read from the spool while a body is streamed
_STATUS_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_PLAIN_ADDRESS = re.compile(r'[^\s<>()\[\]\\,;:@"]+@[^\s<>()\[\]\\,;:@"]+')  # local@domain, UTF-8 too
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # never on a command line: CR/LF would inject commands


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """Timeouts per RFC 5321 §4.5.3.2; aiosmtplib's single 60 s default would cut off a primary
    that takes longer to answer the final dot, and a premature timeout means a retry, a duplicate."""

    local_hostname: str
    connect_timeout: float = 30.0  # TCP connect and the 220 banner
    command_timeout: float = 300.0  # EHLO, MAIL, RCPT, DATA initiation, each data block
    data_timeout: float = 600.0  # the reply to the final dot
    tls_verify: bool = False  # True: STARTTLS required and the certificate verified

    @classmethod
    def from_config(cls, config: Config, domain: str | None = None) -> RelaySettings:
        d = config.delivery
        dcfg = config.domain(domain) if domain else None
        return cls(
            local_hostname=config.server.hostname,
            connect_timeout=d.connect_timeout.total_seconds(),
            command_timeout=d.command_timeout.total_seconds(),
            data_timeout=d.data_timeout.total_seconds(),
            tls_verify=bool(dcfg and dcfg.tls_verify),
        )


class ConnectFailed(Exception):
    """No target answered with a usable session. `reply` says why (for the log and the deferral);
    `unreachable` is True when no target accepted a TCP connection or answered its banner at all."""

    def __init__(self, reply: Reply, target: Target | None, *, unreachable: bool) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.target = target
        self.unreachable = unreachable


@dataclass(frozen=True, slots=True)
class TransactionResult:
    outcomes: tuple[Outcome, ...]  # aligned with the recipients passed to `deliver`
    relay: str  # host:port
    remote_mta: str  # host name, for DSNs
    dsn_offered: bool  # the primary advertised DSN (NOTIFY/ORCPT/RET/ENVID were passed on)
    timed_out: bool = False  # a timeout or dropped connection ended the transaction
    final_reply: Reply | None = None  # the reply to the final dot, when there was one
    lease_lost: bool = False  # lease_check said no: abandoned, outcomes are not to be recorded


LeaseCheck = Callable[[str], Awaitable[bool]]  # "mail" | "dot" -> is the lease still ours (renewed)?


@dataclass(frozen=True, slots=True)
class StoredBody:
    """A body read from the spool while it is sent: `open()` gives a fresh iterator of its chunks
    (Spool.iter_body), so a 50 MB message never sits in memory whole. The iterator may raise after
    its last chunk (a checksum mismatch); the final dot is sent only once it has ended cleanly."""

    size: int
    open: Callable[[], AsyncIterator[bytes]]


Body = bytes | StoredBody


def reply_from(code: int, message: str) -> Reply:
    """An aiosmtplib response as our Reply; the enhanced status code is split off when present, the
    text is otherwise kept verbatim (DSNs quote it) but for bytes that are not UTF-8 (read as Latin-1)
    and controls, so that any reply a primary sends can be recorded (issue 12 item 1)."""
    text = readable(message).strip()
    m = _STATUS_RE.match(text)
    if m:
        return Reply(code, f"{m.group(1)}.{m.group(2)}.{m.group(3)}", text[m.end() :])
    return Reply(code, "", text)


class DotStuffer:
    """RFC 5321 §4.5.2 on a stream: a line starting with "." gets another, also when the CRLF before it
    ended the previous chunk (or its CR did and its LF begins this one). Bodies in the spool never hold
    bare CR or LF, so lines are CRLF-separated. `end()` gives the terminator, with a CRLF first when
    the body did not end with one."""

    def __init__(self) -> None:
        self._tail = b"\r\n"  # the last two bytes seen; the body starts as if after a line end

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        data = self._tail + chunk
        # a match of CRLF "." begins at index 0 at the earliest, so the dot it adds lands after the two
        # tail bytes: they come out unchanged and are cut off again
        stuffed = data.replace(b"\r\n.", b"\r\n..")[2:]
        self._tail = data[-2:]
        return stuffed

    def end(self) -> bytes:
        return b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n"


def dot_stuff(body: bytes) -> bytes:
    """The whole body dot-stuffed and terminated (CRLF . CRLF)."""
    stuffer = DotStuffer()
    return stuffer.feed(body) + stuffer.end()


def _as_outcome(reply: Reply) -> Outcome:
    if 200 <= reply.code < 300:
        return Delivered(reply)
    if reply.code >= 500 and reply.code != 552:
        return Bounced(reply)
    # 4xx, and 552 (RFC 5321 §4.5.3.1.10: treat as temporary), and anything odd: try again
    return Deferred(reply)


def _temp(text: str, status: str = "4.4.2") -> Reply:
    return Reply(451, status, readable(text))  # may quote an exception, which may quote the peer


class RelaySession:
    """One connection to one primary. Not safe for concurrent use; the engine gives each its own."""

    def __init__(self, smtp: aiosmtplib.SMTP, target: Target, settings: RelaySettings, tls: bool) -> None:
        self._smtp = smtp
        self.target = target
        self._settings = settings
        self.tls = tls
        self.transactions = 0
        self._broken = False
        self._stage = ""  # the command a transaction is at, for the reply when the connection fails

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    async def open(cls, targets: Sequence[Target], settings: RelaySettings) -> RelaySession:
        """Connect to the first target that gives a usable session. Raises ConnectFailed."""
        last: ConnectFailed | None = None
        reached_any = False
        for target in targets:
            try:
                return await cls._open_one(target, settings)
            except ConnectFailed as e:
                last = e
                reached_any = reached_any or not e.unreachable
        if last is None:
            raise ConnectFailed(_temp("no route to the primary", "4.4.4"), None, unreachable=True)
        raise ConnectFailed(last.reply, last.target, unreachable=not reached_any)

    @classmethod
    async def _open_one(cls, target: Target, settings: RelaySettings, *, allow_tls: bool = True) -> RelaySession:
        smtp = aiosmtplib.SMTP(
            hostname=target.address or target.host,
            port=target.port,
            local_hostname=settings.local_hostname,
            timeout=settings.command_timeout,
            start_tls=False,  # decided below, after EHLO, so that a failed handshake can fall back
            validate_certs=settings.tls_verify,
        )
        label = target.label
        try:
            await smtp.connect(timeout=settings.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as e:  # banner other than 220 (421, 554 ...)
            smtp.close()
            raise ConnectFailed(reply_from(e.code, e.message), target, unreachable=False) from e
        except aiosmtplib.SMTPConnectTimeoutError as e:
            smtp.close()
            raise ConnectFailed(_temp(f"connect to {label}: timed out", "4.4.1"), target, unreachable=True) from e
        except (aiosmtplib.SMTPConnectError, OSError) as e:
            smtp.close()
            reason = _connect_reason(e)
            raise ConnectFailed(_temp(f"connect to {label}: {reason}", "4.4.1"), target, unreachable=True) from e
        try:
            await cls._hello(smtp, settings)
            tls = False
            if allow_tls and smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(
                        server_hostname=target.host,
                        validate_certs=settings.tls_verify,
                        timeout=settings.command_timeout,
                    )
                    tls = True
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as e:
                    smtp.close()
                    if settings.tls_verify:
                        raise ConnectFailed(
                            _temp(f"TLS with {label} failed: {e}", "4.7.5"), target, unreachable=False
                        ) from e
                    # opportunistic TLS: a broken handshake must not stop mail; retry in clear text
                    return await cls._open_one(target, settings, allow_tls=False)
                await cls._hello(smtp, settings)
            elif settings.tls_verify:
                await _quietly_quit(smtp, settings)
                raise ConnectFailed(
                    _temp(f"{label} does not offer STARTTLS, which is required", "4.7.4"), target, unreachable=False
                )
        except aiosmtplib.SMTPResponseException as e:
            smtp.close()
            raise ConnectFailed(reply_from(e.code, e.message), target, unreachable=False) from e
        except (aiosmtplib.SMTPException, OSError) as e:
            smtp.close()
            raise ConnectFailed(
                _temp(f"{label} dropped the connection during EHLO: {e}"), target, unreachable=False
            ) from e
        return cls(smtp, target, settings, tls)

    @staticmethod
    async def _hello(smtp: aiosmtplib.SMTP, settings: RelaySettings) -> None:
        try:
            await smtp.ehlo(hostname=settings.local_hostname, timeout=settings.command_timeout)
        except aiosmtplib.SMTPHeloError:
            if not smtp.is_connected:
                raise
            await smtp.helo(hostname=settings.local_hostname, timeout=settings.command_timeout)

    # -- state -------------------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        return not self._broken and self._smtp.is_connected

    def supports(self, extension: str) -> bool:
        return self._smtp.supports_extension(extension)

    async def quit(self) -> None:
        if self._smtp.is_connected:
            await _quietly_quit(self._smtp, self._settings)
        self._smtp.close()

    def abort(self) -> None:
        self._broken = True
        self._smtp.close()

    # -- one transaction ---------------------------------------------------------------------------
    async def deliver(
        self,
        envelope: Envelope,
        recipients: Sequence[RecipientRecord],
        body: Body,
        *,
        lease_check: LeaseCheck | None = None,
    ) -> TransactionResult:
        """One MAIL/RCPT.../DATA transaction. Never raises for what the primary does; an error of our
        own is Deferred like any other surprise. `lease_check` is awaited with "mail" before MAIL FROM
        and with "dot" right before the final dot; False (or an error: the lease cannot be shown to be
        ours) abandons the transaction before anything is delivered, and the result says lease_lost."""
        self.transactions += 1
        n = len(recipients)
        outcomes: list[Outcome | None] = [None] * n
        dsn = self.supports("dsn")
        relay, host = self.target.label, self.target.host

        def result(
            fill: Outcome, *, timed_out: bool = False, final: Reply | None = None, lease_lost: bool = False
        ) -> TransactionResult:
            done = tuple(o if o is not None else fill for o in outcomes)
            return TransactionResult(done, relay, host, dsn, timed_out, final, lease_lost)

        def lost() -> TransactionResult:
            outcomes[:] = [None] * n  # nothing was delivered; whatever RCPT said is not ours to record
            return result(
                Deferred(Reply(451, "4.3.0", "lease lost: another worker holds this message")), lease_lost=True
            )

        utf8 = envelope.smtputf8 and self.supports("smtputf8")
        if envelope.smtputf8 and not utf8:
            try:
                needs = await _needs_smtputf8(envelope, recipients, body)
            except BodyUnreadable as e:  # nothing sent yet; the next attempt reads it again
                return result(Deferred(Reply(451, "4.3.0", readable(f"message body unreadable: {e}"))))
            if needs:
                # RFC 6531 §3.4: there is no downgrade of what is UTF-8; the sender must hear of it
                reply = Reply(554, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {relay}")
                return result(Bounced(reply))
            # RFC 6531 §3.2: nothing in it needs the extension, so it goes as plain SMTP

        if lease_check is not None and not await _lease_ours(lease_check, "mail"):
            return lost()

        self._stage = "MAIL FROM"
        try:
            encoding = "utf-8" if utf8 else "ascii"
            sender = "" if envelope.sender in ("", "<>") else envelope.sender  # aiosmtplib: "" is <>
            size = body.size if isinstance(body, StoredBody) else len(body)
            mail_options = self._mail_options(envelope, size, dsn, utf8)
            rcpt_options = [_rcpt_options(r, dsn, utf8) for r in recipients]
            if self.supports("pipelining"):
                accepted, ended = await self._envelope_pipelined(
                    sender, mail_options, recipients, rcpt_options, encoding, outcomes
                )
            else:
                accepted, ended = await self._envelope_one_by_one(
                    sender, mail_options, recipients, rcpt_options, encoding, outcomes
                )
            if ended is not None:
                return result(ended)

            self._stage = "DATA"
            final = await self._body(body, lease_check)
            if final is None:
                return lost()
            if final.code == 421:
                self._broken = True  # the primary closes the session after a 421 (RFC 5321 §3.8)
            outcome = _as_outcome(final)
            for i in accepted:
                outcomes[i] = outcome
            return result(outcome, final=final)
        except aiosmtplib.SMTPResponseException as e:  # e.g. 421 to MAIL, or DATA refused
            reply = reply_from(e.code, e.message)
            if e.code == 421 or not self._smtp.is_connected:
                self._broken = True
            else:
                await self._reset_quietly()
            return result(_as_outcome(reply))
        except (aiosmtplib.SMTPTimeoutError, TimeoutError) as e:
            self.abort()
            return result(Deferred(_temp(f"timed out after {self._stage} with {relay}: {e}")), timed_out=True)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError, OSError):
            self.abort()
            return result(Deferred(_temp(f"lost connection with {relay} after {self._stage}")), timed_out=True)
        except BodyUnreadable as e:
            self.abort()  # closes without the final dot: the primary takes nothing
            return result(Deferred(Reply(451, "4.3.0", readable(f"message body unreadable: {e}"))))
        except Exception as e:  # unknown error = temporary, never a bounce
            self.abort()  # closes without the final dot: the primary takes nothing
            return result(
                Deferred(Reply(451, "4.3.0", readable(f"internal error talking to {relay}: {type(e).__name__}")))
            )

    async def _envelope_one_by_one(
        self,
        sender: str,
        mail_options: list[str],
        recipients: Sequence[RecipientRecord],
        rcpt_options: list[list[str]],
        encoding: str,
        outcomes: list[Outcome | None],
    ) -> tuple[list[int], Outcome | None]:
        """MAIL, each RCPT and DATA, each awaiting its reply (a primary without PIPELINING). Returns the
        accepted recipients' indexes and, when the transaction ended before the body, the outcome for
        every recipient without one; refused recipients get theirs in `outcomes`. A reply that ends
        the transaction otherwise (DATA refused, 421 to MAIL) is raised, as aiosmtplib raises it."""
        cmd_t = self._settings.command_timeout
        try:
            await self._smtp.mail(sender, options=mail_options, encoding=encoding, timeout=cmd_t)
        except aiosmtplib.SMTPSenderRefused as e:
            await self._reset_quietly()
            return [], _as_outcome(reply_from(e.code, e.message))
        self._stage = "RCPT TO"
        accepted: list[int] = []
        for i, rcpt in enumerate(recipients):
            try:
                await self._smtp.rcpt(rcpt.address, options=rcpt_options[i], encoding=encoding, timeout=cmd_t)
                accepted.append(i)
            except aiosmtplib.SMTPRecipientRefused as e:
                outcomes[i] = _as_outcome(reply_from(e.code, e.message))
                if e.code == 421:
                    self._broken = True
                    return [], Deferred(reply_from(e.code, e.message))
        if not accepted:
            await self._reset_quietly()
            return [], Deferred(_temp("no recipient accepted"))
        self._stage = "DATA"
        start = await self._smtp.execute_command(b"DATA", timeout=cmd_t)
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        return accepted, None

    async def _envelope_pipelined(
        self,
        sender: str,
        mail_options: list[str],
        recipients: Sequence[RecipientRecord],
        rcpt_options: list[list[str]],
        encoding: str,
        outcomes: list[Outcome | None],
    ) -> tuple[list[int], Outcome | None]:
        """The same with PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one write, then their
        replies read in order, each within command_timeout, by our own reader (pipelining.py: aiosmtplib
        loses replies that arrive together). Every reply is checked (§3.1): a refused MAIL decides for
        all (the RCPT replies to it are 503s, not verdicts); with no recipient accepted a DATA that was
        refused is followed by RSET, one that got 354 by a lone dot, and no body is sent; a 421 anywhere
        ends the session without reading on."""
        smtp, cmd_t = self._smtp, self._settings.command_timeout
        protocol = smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost before MAIL FROM")
        group = [_command(b"MAIL", b"FROM:" + _path(sender).encode(encoding), mail_options)]
        group += [
            _command(b"RCPT", b"TO:" + _path(r.address).encode(encoding), rcpt_options[i])
            for i, r in enumerate(recipients)
        ]
        group.append(b"DATA\r\n")
        reader = GroupReplies.take(protocol)
        try:
            write_group(protocol, group)
            mail, accepted, data = await self._group_replies(reader, len(recipients), outcomes)
            if not reader.give_back():
                raise aiosmtplib.SMTPResponseException(-1, "unexpected data after the command group's replies")
        except _SessionEnded as e:  # a 421: the primary closes; every recipient still open is deferred
            reader.give_back()
            self.abort()
            return [], Deferred(e.reply)
        except BaseException:
            # out of step with the primary (a reply missing, malformed or late): an RSET now could be
            # answered by a reply meant for the group, and a 354 still due would make our next commands
            # a message body; so this connection ends here, and the outcome is a deferral
            reader.give_back()
            self.abort()
            raise
        if mail.code // 100 == 2 and accepted and data.code == 354:
            return accepted, None
        if data.code == 354:  # nothing to deliver, yet the primary waits for a message: an empty one ends it
            protocol.write(b".\r\n")
            await protocol.read_response(timeout=cmd_t)
        await self._reset_quietly()
        if mail.code // 100 != 2:
            return [], _as_outcome(mail)
        if not accepted:
            return [], Deferred(_temp("no recipient accepted"))
        return [], _as_outcome(data)  # DATA refused: the recipients it accepted share that reply

    async def _group_replies(
        self, reader: GroupReplies, n: int, outcomes: list[Outcome | None]
    ) -> tuple[Reply, list[int], Reply]:
        """The replies to MAIL, n RCPTs and DATA, in order. Raises _SessionEnded at a 421."""
        mail = await self._group_reply(reader)
        self._stage = "RCPT TO"
        accepted: list[int] = []
        for i in range(n):
            reply = await self._group_reply(reader)
            if mail.code // 100 != 2:
                continue  # "503 need MAIL": the refused MAIL decides, not this
            if reply.code in (250, 251):
                accepted.append(i)
            else:
                outcomes[i] = _as_outcome(reply)
        self._stage = "DATA"
        return mail, accepted, await self._group_reply(reader)

    async def _group_reply(self, reader: GroupReplies) -> Reply:
        reply = reply_from(*await reader.read(self._settings.command_timeout))
        if reply.code == 421:
            raise _SessionEnded(reply)
        return reply

    def _mail_options(self, envelope: Envelope, size: int, dsn: bool, utf8: bool) -> list[str]:
        opts: list[str] = []
        if self.supports("size"):
            opts.append(f"SIZE={size}")
        if envelope.body_type and envelope.body_type.upper() == "8BITMIME" and self.supports("8bitmime"):
            # Without 8BITMIME on the primary we still send the bytes unchanged: converting to 7 bit
            # would break signatures and the byte-exact promise, and primaries accept 8-bit in practice.
            opts.append("BODY=8BITMIME")
        if utf8:
            opts.append("SMTPUTF8")
        if dsn:
            if envelope.ret:
                opts.append(f"RET={envelope.ret}")
            if envelope.envid:
                opts.append(f"ENVID={envelope.envid if utf8 else _xtext_ascii(envelope.envid)}")
        return opts

    async def _body(self, body: Body, lease_check: LeaseCheck | None) -> Reply | None:
        """The message after DATA's 354, our own way, because aiosmtplib's `data()` uses one timeout
        for the 354, the whole upload and the final reply, needs the whole message in memory and
        rewrites line endings. Here the body is streamed (read from the spool chunk by chunk,
        dot-stuffed on the fly) with each block drained within command_timeout, then the reply to the
        final dot within data_timeout (10 min, RFC 5321 §4.5.3.2.6), so a slow primary never causes a
        false retry, hence a duplicate. Returns None when the lease was lost before the dot (the
        connection is then closed without it). Raises aiosmtplib errors for the caller to map."""
        smtp = self._smtp
        protocol = smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost before the message")
        stuffer = DotStuffer()
        async for chunk in _chunks(body):
            for offset in range(0, len(chunk), CHUNK):
                protocol.write(stuffer.feed(chunk[offset : offset + CHUNK]))
                # wait for the kernel to take each block (aiosmtplib's flow control helper): memory
                # stays at a few blocks however large the message
                await asyncio.wait_for(protocol._drain_helper(), self._settings.command_timeout)
        if lease_check is not None and not await _lease_ours(lease_check, "dot"):
            self.abort()  # without the dot the primary discards what it got (RFC 5321 §4.1.1.4)
            return None
        # no await between the last write and read_response: the final reply cannot slip past
        protocol.write(stuffer.end())
        try:
            final = await protocol.read_response(timeout=self._settings.data_timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            smtp.close()
            raise
        return reply_from(final.code, final.message)

    async def _reset_quietly(self) -> None:
        if not self._smtp.is_connected:
            self._broken = True
            return
        try:
            await self._smtp.rset(timeout=self._settings.command_timeout)
        except Exception:
            self.abort()


async def _quietly_quit(smtp: aiosmtplib.SMTP, settings: RelaySettings) -> None:
    try:
        await smtp.quit(timeout=min(settings.command_timeout, 30.0))
    except Exception:
        smtp.close()


def _connect_reason(e: BaseException) -> str:
    cause = e.__cause__ if e.__cause__ is not None else e
    if isinstance(cause, ConnectionRefusedError):
        return "Connection refused"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(e) or type(e).__name__


class _SessionEnded(Exception):
    """A 421 in a pipelined group's replies: the primary is closing the session (RFC 5321 §3.8)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class BodyUnreadable(Exception):
    """The spool could not give the body (gone, or set aside as damaged) while it was being sent."""


async def _chunks(body: Body) -> AsyncIterator[bytes]:
    if isinstance(body, bytes):
        yield body
        return
    try:
        async for chunk in body.open():
            yield chunk
    except Exception as e:
        raise BodyUnreadable(f"{type(e).__name__}: {e}") from e


async def _lease_ours(check: LeaseCheck, stage: str) -> bool:
    try:
        return bool(await check(stage))
    except Exception:  # the lease cannot be shown to be ours: sending on would risk a second copy
        log.warning("lease check before %s failed; the transaction is abandoned", stage, exc_info=True)
        return False


async def _needs_smtputf8(envelope: Envelope, recipients: Sequence[RecipientRecord], body: Body) -> bool:
    """RFC 6531 §3.2: a message needs SMTPUTF8 only for a UTF-8 envelope address or 8-bit text in
    its header section (UTF-8 header fields, RFC 6532). 8-bit body text is 8BITMIME's business. The
    header section is read chunk by chunk up to its end; raises BodyUnreadable (a deferral, never a
    bounce) when the spool cannot give it."""
    if not envelope.sender.isascii() or any(not r.address.isascii() for r in recipients):
        return True
    tail = b""
    async for chunk in _chunks(body):
        data = tail + chunk
        end = data.find(b"\r\n\r\n")
        head = data if end < 0 else data[:end]
        if not head.isascii():
            return True
        if end >= 0 or data.startswith(b"\r\n"):
            return False
        tail = data[-3:]  # the separator may straddle two chunks
    return False


def _rcpt_options(rcpt: RecipientRecord, dsn: bool, utf8: bool) -> list[str]:
    options: list[str] = []
    if dsn:
        if rcpt.notify:
            options.append("NOTIFY=" + ",".join(rcpt.notify))
        if rcpt.orcpt:
            options.append("ORCPT=" + (rcpt.orcpt if utf8 else _ascii_orcpt(rcpt.orcpt)))
    return options


def _path(address: str) -> str:
    """`<address>` for MAIL/RCPT as aiosmtplib writes it. Its quote_address runs email.utils.parseaddr,
    3.9 % of the delivery profile (docs/performance.md); a plain local@domain (what our SMTP server
    accepted, nearly always) needs none of that, anything else still goes through it."""
    if not address:
        return "<>"
    if _PLAIN_ADDRESS.fullmatch(address):
        return f"<{address}>"
    return quote_address(address)


def _command(verb: bytes, arg: bytes, options: Sequence[str]) -> bytes:
    """One command line of a pipelined group, checked as aiosmtplib checks its own (a ValueError, which
    ends the attempt as a deferral before anything is written)."""
    parts = [verb, arg, *(o.encode("ascii") for o in options)]
    if any(_CONTROL.search(p) for p in parts):
        raise ValueError("command argument contains a control character")
    return b" ".join(parts) + b"\r\n"


def _xtext_ascii(value: str) -> str:
    """A DSN parameter value with its non-ASCII characters as xtext ("+HH" per UTF-8 octet), for a
    primary that has no SMTPUTF8 (RFC 6533 §6: ASCII only there)."""
    if value.isascii():
        return value
    return "".join(c if c.isascii() else "".join(f"+{b:02X}" for b in c.encode("utf-8")) for c in value)


def _ascii_orcpt(orcpt: str) -> str:
    """ORCPT for a primary without SMTPUTF8: a utf-8 address in utf-8-addr-xtext form ("\\x{HH}",
    RFC 6533 §3), any other type's non-ASCII as xtext."""
    kind, _, value = orcpt.partition(";")
    if value.isascii():
        return orcpt
    if kind.strip().lower() == "utf-8":
        return kind + ";" + "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in value)
    return kind + ";" + _xtext_ascii(value)
