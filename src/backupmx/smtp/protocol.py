"""The inbound SMTP protocol as a sans-IO state machine: bytes in, events and reply bytes out.

In the spirit of h11: `receive_data(bytes)` feeds input, `next_event()` returns the next event (or
NEED_DATA / CLOSED), and the replies to send are collected in `data_to_send()` so that a pipelined batch
of commands is answered with one write. Events that need a decision (HELO/EHLO, MAIL, RCPT, DATA, the end
of DATA) pause the machine until the caller answers with `accept()` or `refuse(reply)`; everything the
protocol can decide alone (syntax, sequence, limits, NOOP/RSET/VRFY/HELP/QUIT) it answers itself.

DATA content is scanned in large chunks with `bytes.find`/`count`/`replace` (never line by line in
Python): it ends only at `<CRLF>.<CRLF>` (the CRLF of the DATA line counts, so `.<CRLF>` right after the
354 is an empty message); dot-stuffing is undone; any bare CR, bare LF or NUL in the content makes the
whole message rejected after the real end (550 5.5.2, the SMTP-smuggling defence: a fake ending never
ends anything, and what follows it stays body text); the size limit is enforced while streaming (excess
discarded, read to the end, 552 5.3.4); `Received:` headers are counted (554 5.4.6 above the limit).
Content lines longer than 1000 octets and 8-bit bytes without BODY=8BITMIME are accepted and kept
as sent (byte-exact beats folding; RELIABILITY.md #41/#45 leave this to policy).
Memory is bounded: command lines by the line limit, DATA by what the caller does with DataChunk events.

Misuse of the API (calling next_event while a decision is pending, deciding twice) raises
ProtocolUsageError; nothing the peer sends raises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto

from backupmx.model import Recipient
from backupmx.reply import Reply
from backupmx.smtp.address import (
    AddressError,
    AddressErrorKind,
    Mailbox,
    is_xtext,
    parse_params,
    parse_path,
    split_path,
)
from backupmx.smtp.xtext import envid_carriable, orcpt_carriable

CRLF = b"\r\n"
LINE_LIMIT = 512  # octets, CRLF included (RFC 5321 §4.5.3.1.4)
LINE_LIMIT_PATH = 1024  # MAIL/RCPT with SIZE, DSN (NOTIFY, a long ORCPT) and SMTPUTF8 parameters
_TERMINATOR = b"\r\n.\r\n"
_KEEP = len(_TERMINATOR) - 1  # bytes kept back at a chunk's end: a terminator may start there
_RECEIVED = b"\r\nreceived:"


class State(Enum):
    GREETING = auto()  # the banner is not sent yet
    CONNECTED = auto()  # banner sent, no HELO/EHLO yet
    READY = auto()  # greeted, no transaction
    MAIL = auto()  # MAIL accepted, collecting RCPT
    DATA = auto()  # after 354, reading content
    TLS_PENDING = auto()  # 220 to STARTTLS sent; input is discarded until the handshake is done
    CLOSED = auto()  # nothing more is read; flush data_to_send() and close


class Sentinel(Enum):
    NEED_DATA = auto()
    CLOSED = auto()


NEED_DATA = Sentinel.NEED_DATA
CLOSED = Sentinel.CLOSED


class ProtocolUsageError(RuntimeError):
    """The caller broke the API contract (a bug on our side, never the peer's doing)."""


# --- replies the protocol gives on its own --------------------------------------------------------
R_OK = Reply(250, "2.0.0", "Ok")
R_MAIL_OK = Reply(250, "2.1.0", "Ok")
R_RCPT_OK = Reply(250, "2.1.5", "Ok")
R_DATA_GO = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
R_BYE = Reply(221, "2.0.0", "Bye")
R_TLS_GO = Reply(220, "2.0.0", "Ready to start TLS")
R_VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
R_HELP = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS")
R_UNKNOWN = Reply(500, "5.5.1", "Error: command not recognized")
R_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
R_BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
R_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
R_BAD_UTF8 = Reply(500, "5.5.2", "Error: command is not valid UTF-8")
R_HELO_FIRST = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
R_NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
R_NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
R_NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
R_NO_VALID_RCPT = Reply(554, "5.5.1", "Error: no valid recipients")
R_TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
R_TLS_IN_TX = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
R_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors, closing connection")
R_TOO_MANY_COMMANDS = Reply(421, "4.7.0", "Error: too many commands, closing connection")
R_TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
R_SIZE_AT_MAIL = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
R_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
R_BARE_NEWLINE = Reply(550, "5.5.2", "Message contains bare CR or LF")
R_NUL = Reply(550, "5.5.2", "Message contains NUL character")
R_TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops")
R_PREGREET = Reply(554, "5.5.1", "Protocol error: talked before greeting")
R_SYNC = Reply(554, "5.5.0", "Error: SMTP protocol synchronization")

_SYNTAX = {
    "MAIL": Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"),
    "RCPT": Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"),
    "EHLO": Reply(501, "5.5.4", "Syntax: EHLO hostname"),
    "HELO": Reply(501, "5.5.4", "Syntax: HELO hostname"),
    "DATA": Reply(501, "5.5.4", "Syntax: DATA"),
    "RSET": Reply(501, "5.5.4", "Syntax: RSET"),
    "QUIT": Reply(501, "5.5.4", "Syntax: QUIT"),
    "STARTTLS": Reply(501, "5.5.4", "Syntax: STARTTLS"),
    "VRFY": Reply(501, "5.5.4", "Syntax: VRFY address"),
}
_NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "BDAT", "AUTH", "ATRN", "SAML", "SEND", "SOML", "XCLIENT"})


def address_reply(kind: AddressErrorKind, *, sender: bool) -> Reply:
    """The reply for a refused path (the table in address.py's docstring)."""
    status = "5.1.7" if sender else "5.1.3"
    who = "sender" if sender else "recipient"
    if kind is AddressErrorKind.UTF8:
        return Reply(553, "5.6.7", f"Non-ASCII {who} address requires SMTPUTF8")
    if kind is AddressErrorKind.TOO_LONG:
        return Reply(553, status, f"{who.capitalize()} address too long")
    return Reply(501, status, f"Bad {who} address syntax")


# --- configuration and transaction values ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    hostname: str
    max_message_size: int = 50_000_000
    max_recipients: int = 1000
    max_commands: int = 10_000
    max_errors: int = 10
    max_received_headers: int = 50
    tls_available: bool = False
    postmaster_domain: str = ""  # a bare <postmaster> becomes postmaster@this (empty: kept bare)
    # Postfix's smtpd_forbid_unauth_pipelining: input already waiting when we answer EHLO/HELO or DATA
    # (RFC 2920: they end a group), or any command of a HELO session, gets 554 5.5.0 and the end
    forbid_early_pipelining: bool = False


@dataclass(frozen=True, slots=True)
class MailParams:
    size: int | None = None
    body_type: str | None = None  # "7BIT" | "8BITMIME"
    smtputf8: bool = False
    ret: str | None = None  # "FULL" | "HDRS"
    envid: str | None = None


@dataclass(slots=True)
class Transaction:
    sender: str  # "" for <>
    params: MailParams
    recipients: list[Recipient] = field(default_factory=list)
    attempted: int = 0  # RCPT commands seen (accepted or not)


# --- events ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello:
    """HELO/EHLO with a syntactically acceptable name. Decision: accept() sends the EHLO/HELO reply."""

    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class MailFrom:
    """Decision: accept() starts the transaction."""

    sender: str  # "" for <>
    params: MailParams


@dataclass(frozen=True, slots=True)
class RcptTo:
    """Decision: accept() adds the recipient."""

    recipient: Recipient
    mailbox: Mailbox


@dataclass(frozen=True, slots=True)
class DataRequested:
    """DATA with at least one accepted recipient. Decision: accept() sends 354."""


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Message content, dot-stuffing undone; the concatenation is the message, byte for byte."""

    data: bytes


@dataclass(frozen=True, slots=True)
class DataComplete:
    """The real end of DATA, content clean. Decision: accept(250 ... queued) / refuse(451/452...)."""

    size: int
    received_headers: int


@dataclass(frozen=True, slots=True)
class DataRejected:
    """The content was refused (already answered with `reply`); discard what DataChunk delivered."""

    reply: Reply
    size: int


@dataclass(frozen=True, slots=True)
class StartTls:
    """220 queued: flush data_to_send(), do the handshake, then call tls_established()."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """The protocol refused a command on its own (syntax, sequence, limit); for the mail log."""

    command: str
    argument: str
    reply: Reply


Event = Hello | MailFrom | RcptTo | DataRequested | DataChunk | DataComplete | DataRejected | StartTls | Rejected
_DECISIONS = (Hello, MailFrom, RcptTo, DataRequested, DataComplete)


class SmtpConnection:
    """One server-side SMTP session, without I/O."""

    def __init__(self, config: ProtocolConfig, *, tls: bool = False) -> None:
        self.config = config
        self.state = State.GREETING
        self.tls = tls
        self.helo: str | None = None
        self.extended = False
        self.transaction: Transaction | None = None
        self.commands = 0
        self.errors = 0
        self.talked_early = False
        self._sync_error: Rejected | None = None  # early pipelining seen at a decision: reported first
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._pending: Event | None = None
        self._discarding_line = False
        # DATA scanner state
        self._data_start = False  # nothing of this message's content handed out yet
        self._data_size = 0
        self._data_error: Reply | None = None
        self._in_headers = True
        self._hdr_tail = b""
        self._received = 0
        self._data_done = False

    def __repr__(self) -> str:
        return (
            f"<SmtpConnection {self.state.name} helo={self.helo!r} tls={self.tls} "
            f"pending={type(self._pending).__name__ if self._pending else None} buffered={len(self._buf)}>"
        )

    # -- input / output ----------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self.state in (State.CLOSED, State.TLS_PENDING):
            return  # after STARTTLS, plaintext already sent is an injection attempt: dropped
        if self.state is State.GREETING and data:
            self.talked_early = True
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _reply(self, reply: Reply) -> None:
        self._out.append(reply.to_bytes())
        if reply.code == 421:
            self._close()

    def _close(self) -> None:
        self.state = State.CLOSED
        self._buf.clear()
        self.transaction = None

    # -- calls from the transport ------------------------------------------------------------------
    def greet(self, banner: Reply, *, reject_early_talkers: bool = True) -> bool:
        """Send the banner. False (and 554, closed) when the client talked before it and
        `reject_early_talkers` (the transport passes False when it did not hold the banner back)."""
        if self.state is not State.GREETING:
            raise ProtocolUsageError("greet() twice")
        if self.talked_early and reject_early_talkers:
            self._reply(R_PREGREET)
            self._close()
            return False
        self.state = State.CONNECTED
        self._reply(banner)
        if banner.code != 220:
            self._close()
            return False
        return True

    def send_and_close(self, reply: Reply) -> None:
        """Say `reply` (421 shutdown, timeout...) and stop reading."""
        self._pending = None
        self._reply(reply)
        self._close()

    def tls_established(self) -> None:
        """RFC 3207 §4.2: forget everything learned before TLS; EHLO is needed again."""
        if self.state is not State.TLS_PENDING:
            raise ProtocolUsageError("tls_established() without STARTTLS")
        self.tls = True
        self.state = State.CONNECTED
        self.helo = None
        self.extended = False
        self.transaction = None
        self._buf.clear()

    @property
    def idle(self) -> bool:
        """Between commands (not in DATA, not waiting for a decision)."""
        return self._pending is None and self.state in (State.CONNECTED, State.READY, State.MAIL)

    # -- decisions ---------------------------------------------------------------------------------
    def accept(self, reply: Reply | None = None) -> None:
        if isinstance(self._pending, DataComplete) and reply is None:
            raise ProtocolUsageError("the end of DATA needs an explicit reply")
        ev = self._take_pending()
        if self._pipelined_early(ev):
            return
        if isinstance(ev, Hello):
            self.helo = ev.name
            self.extended = ev.extended
            self.transaction = None
            self.state = State.READY
            self._reply(reply or self._hello_reply(ev.extended))
        elif isinstance(ev, MailFrom):
            self.transaction = Transaction(ev.sender, ev.params)
            self.state = State.MAIL
            self._reply(reply or R_MAIL_OK)
        elif isinstance(ev, RcptTo):
            assert self.transaction is not None
            self.transaction.recipients.append(ev.recipient)
            self._reply(reply or R_RCPT_OK)
        elif isinstance(ev, DataRequested):
            self._start_data()
            self._reply(reply or R_DATA_GO)
        elif isinstance(ev, DataComplete):
            assert reply is not None
            self._end_transaction()
            self._reply(reply)

    def _pipelined_early(self, ev: Event) -> bool:
        """With forbid_early_pipelining: input is already waiting although this reply was due first (checked
        at the decision, so it also sees what came while the policy was asked). Answers 554 and closes."""
        if not self.config.forbid_early_pipelining or not self._buf:
            return False
        if isinstance(ev, Hello):
            verb = "EHLO" if ev.extended else "HELO"
        elif isinstance(ev, DataRequested):
            verb = "DATA"
        elif isinstance(ev, MailFrom | RcptTo) and not self.extended:
            verb = "MAIL" if isinstance(ev, MailFrom) else "RCPT"
        else:
            return False
        early = bytes(self._buf[:100]).decode("utf-8", "replace")
        self._reply(R_SYNC)
        self._close()
        self._sync_error = Rejected(verb, f"pipelined before our reply: {early}", R_SYNC)
        return True

    def refuse(self, reply: Reply) -> None:
        ev = self._take_pending()
        if isinstance(ev, DataComplete):
            self._end_transaction()
        self._reply(reply)

    def _take_pending(self) -> Event:
        ev = self._pending
        if ev is None:
            raise ProtocolUsageError("no decision is pending")
        self._pending = None
        return ev

    def _hello_reply(self, extended: bool) -> Reply:
        if not extended:
            return Reply(250, "", self.config.hostname)
        lines = [
            self.config.hostname,
            "PIPELINING",
            f"SIZE {self.config.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
        ]
        if self.config.tls_available and not self.tls:
            lines.append("STARTTLS")
        return Reply(250, "", "\n".join(lines))

    def _end_transaction(self) -> None:
        self.transaction = None
        self.state = State.READY

    # -- the event pump ----------------------------------------------------------------------------
    def next_event(self) -> Event | Sentinel:
        if self._pending is not None:
            raise ProtocolUsageError("a decision is pending: call accept() or refuse() first")
        sync_error = self._sync_error
        if sync_error is not None:
            self._sync_error = None
            return sync_error
        while True:
            if self.state is State.CLOSED:
                return CLOSED
            if self.state is State.DATA:
                return self._next_data_event()
            if self.state in (State.GREETING, State.TLS_PENDING):
                return NEED_DATA
            line = self._next_line()
            if line is None:
                return self._need_data()
            ev = self._command(line)
            if ev is not None:
                if isinstance(ev, _DECISIONS):
                    self._pending = ev
                return ev

    def _need_data(self) -> Sentinel:
        # _next_line() may have closed the session (too many errors while discarding a long line)
        return CLOSED if self.state is State.CLOSED else NEED_DATA

    def _next_line(self) -> bytes | None:
        buf = self._buf
        if self._discarding_line:
            nl = buf.find(b"\n")
            if nl < 0:
                buf.clear()
                return None
            del buf[: nl + 1]
            self._discarding_line = False
            self.commands += 1
            self._error(R_LINE_TOO_LONG)
            if self.state is State.CLOSED:
                return None
        nl = buf.find(b"\n", 0, LINE_LIMIT_PATH + 1)
        if nl < 0:
            if len(buf) > LINE_LIMIT_PATH:
                # memory stays bounded however long the line: drop it up to its end (or all we have)
                self._discarding_line = True
                return self._next_line()
            return None
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        return line

    def _error(self, reply: Reply, command: str = "", argument: str = "") -> Rejected | None:
        """A protocol error: answer it, count it, close after too many."""
        self.errors += 1
        if self.errors >= self.config.max_errors:
            self._reply(R_TOO_MANY_ERRORS)
            return None
        self._reply(reply)
        if command:
            return Rejected(command, argument, reply)
        return None

    def _command(self, raw: bytes) -> Event | None:
        self.commands += 1
        if self.commands > self.config.max_commands:
            self._reply(R_TOO_MANY_COMMANDS)
            return None
        verb_b = raw.partition(b" ")[0].upper()
        limit = LINE_LIMIT_PATH if verb_b in (b"MAIL", b"RCPT") else LINE_LIMIT
        if len(raw) + 2 > limit:
            return self._error(R_LINE_TOO_LONG)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(R_BAD_UTF8)
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        arg = arg.strip(" ")
        if not verb:
            return self._error(R_BAD_SYNTAX)
        handler = _HANDLERS.get(verb)
        if handler is None:
            return self._error(R_NOT_IMPLEMENTED if verb in _NOT_IMPLEMENTED else R_UNKNOWN)
        return handler(self, verb, arg)

    # -- commands ----------------------------------------------------------------------------------
    def _cmd_hello(self, verb: str, arg: str) -> Event | None:
        if not arg:
            return self._error(_SYNTAX[verb], verb, arg)
        if any((ord(c) < 0x21 and c != " ") or ord(c) == 0x7F for c in arg) or not arg.isascii():
            return self._error(Reply(501, "5.5.2", "Invalid hostname"), verb, arg)
        return Hello(arg, verb == "EHLO")

    def _cmd_noop(self, verb: str, arg: str) -> Event | None:
        self._reply(R_OK)
        return None

    def _cmd_rset(self, verb: str, arg: str) -> Event | None:
        if arg:
            return self._error(_SYNTAX[verb])
        self.transaction = None
        if self.state is State.MAIL:
            self.state = State.READY
        self._reply(R_OK)
        return None

    def _cmd_quit(self, verb: str, arg: str) -> Event | None:
        if arg:
            return self._error(_SYNTAX[verb])
        self._reply(R_BYE)
        self._close()
        return None

    def _cmd_help(self, verb: str, arg: str) -> Event | None:
        self._reply(R_HELP)
        return None

    def _cmd_vrfy(self, verb: str, arg: str) -> Event | None:
        if self.state is State.CONNECTED:
            return self._error(R_HELO_FIRST)
        if not arg:
            return self._error(_SYNTAX[verb])
        self._reply(R_VRFY)
        return None

    def _cmd_starttls(self, verb: str, arg: str) -> Event | None:
        if not self.config.tls_available:
            return self._error(R_NOT_IMPLEMENTED)
        if arg:
            return self._error(_SYNTAX[verb])
        if self.tls:
            return self._error(R_TLS_ACTIVE)
        if self.state is State.CONNECTED:
            return self._error(R_HELO_FIRST)
        if self.state is State.MAIL:
            return self._error(R_TLS_IN_TX)
        self._reply(R_TLS_GO)
        self.state = State.TLS_PENDING
        self._buf.clear()  # RFC 3207 §4.2 / CVE-2011-0411: nothing pipelined after STARTTLS counts
        return StartTls()

    def _cmd_mail(self, verb: str, arg: str) -> Event | None:
        if self.state is State.CONNECTED:
            return self._error(R_HELO_FIRST, verb, arg)
        if self.state is State.MAIL:
            return self._error(R_NESTED_MAIL, verb, arg)
        if arg[:5].upper() != "FROM:":
            return self._error(_SYNTAX[verb], verb, arg)
        try:
            path, params_text = split_path(arg[5:])
            params_list = parse_params(params_text, utf8=True)
        except AddressError as e:
            return self._error(address_reply(e.kind, sender=True), verb, arg)
        utf8 = any(k == "SMTPUTF8" for k, _ in params_list)
        try:
            mailbox = parse_path(path, null_ok=True, postmaster_ok=False, utf8=utf8)
        except AddressError as e:
            return self._error(address_reply(e.kind, sender=True), verb, arg)
        params_or_reply = self._mail_params(params_list, utf8)
        if isinstance(params_or_reply, Reply):
            return self._error(params_or_reply, verb, arg)
        return MailFrom("" if mailbox is None else str(mailbox), params_or_reply)

    def _mail_params(self, items: list[tuple[str, str | None]], utf8: bool) -> MailParams | Reply:
        seen: set[str] = set()
        size: int | None = None
        body: str | None = None
        ret: str | None = None
        envid: str | None = None
        for key, value in items:
            if not self.extended:
                return Reply(555, "5.5.4", f"Unsupported option: {key}")
            if key in seen:
                return Reply(501, "5.5.4", f"Duplicate {key} parameter")
            seen.add(key)
            if key == "SIZE":
                if value is None or not value.isdigit() or not value.isascii() or len(value) > 20:
                    return Reply(501, "5.5.4", "Bad SIZE parameter syntax")
                size = int(value)
                if size > self.config.max_message_size:
                    return R_SIZE_AT_MAIL
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return Reply(501, "5.5.4", "Bad BODY parameter syntax")
                body = value.upper()
            elif key == "SMTPUTF8":
                if value is not None:
                    return Reply(501, "5.5.4", "Bad SMTPUTF8 parameter syntax")
            elif key == "RET":
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    return Reply(501, "5.5.4", "Bad RET parameter syntax")
                ret = value.upper()
            elif key == "ENVID":
                if value is None or len(value) > 100 or not is_xtext(value, utf8=utf8):
                    return Reply(501, "5.5.4", "Bad ENVID parameter syntax")
                if not envid_carriable(value):  # RFC 3461 §4.4: printable US-ASCII once decoded
                    return Reply(501, "5.5.4", "Bad ENVID parameter: must be printable US-ASCII once decoded")
                envid = value
            else:
                return Reply(555, "5.5.4", f"Unsupported option: {key}")
        if not utf8:
            for _key, value in items:
                if value is not None and not value.isascii():
                    return Reply(553, "5.6.7", "Non-ASCII parameter requires SMTPUTF8")
        return MailParams(size=size, body_type=body, smtputf8=utf8, ret=ret, envid=envid)

    def _cmd_rcpt(self, verb: str, arg: str) -> Event | None:
        if self.state is State.CONNECTED:
            return self._error(R_HELO_FIRST, verb, arg)
        tx = self.transaction
        if self.state is not State.MAIL or tx is None:
            return self._error(R_NEED_MAIL, verb, arg)
        if arg[:3].upper() != "TO:":
            return self._error(_SYNTAX[verb], verb, arg)
        utf8 = tx.params.smtputf8
        try:
            path, params_text = split_path(arg[3:])
            mailbox = parse_path(path, null_ok=False, postmaster_ok=True, utf8=utf8)
            params_list = parse_params(params_text, utf8=utf8)
        except AddressError as e:
            return self._error(address_reply(e.kind, sender=False), verb, arg)
        assert mailbox is not None
        params_or_reply = self._rcpt_params(params_list, utf8)
        if isinstance(params_or_reply, Reply):
            return self._error(params_or_reply, verb, arg)
        tx.attempted += 1
        if len(tx.recipients) >= self.config.max_recipients:
            # not a protocol error: the client sends the rest in another transaction (RFC 5321 §4.5.3.1.10)
            self._reply(R_TOO_MANY_RCPTS)
            return Rejected(verb, arg, R_TOO_MANY_RCPTS)
        if not mailbox.domain and self.config.postmaster_domain:
            mailbox = Mailbox(mailbox.local, self.config.postmaster_domain)
        notify, orcpt = params_or_reply
        return RcptTo(Recipient(str(mailbox), notify, orcpt), mailbox)

    def _rcpt_params(
        self, items: list[tuple[str, str | None]], utf8: bool
    ) -> tuple[tuple[str, ...] | None, str | None] | Reply:
        seen: set[str] = set()
        notify: tuple[str, ...] | None = None
        orcpt: str | None = None
        for key, value in items:
            if not self.extended:
                return Reply(555, "5.5.4", f"Unsupported option: {key}")
            if key in seen:
                return Reply(501, "5.5.4", f"Duplicate {key} parameter")
            seen.add(key)
            if key == "NOTIFY":
                words = tuple(w.upper() for w in (value or "").split(","))
                ok = (words == ("NEVER",)) or (
                    bool(words)
                    and len(set(words)) == len(words)
                    and all(w in ("SUCCESS", "FAILURE", "DELAY") for w in words)
                )
                if value is None or not ok:
                    return Reply(501, "5.5.4", "Bad NOTIFY parameter syntax")
                notify = words
            elif key == "ORCPT":
                addr_type, semi, xtext = (value or "").partition(";")
                if (
                    value is None
                    or not semi
                    or len(value) > 500
                    or not addr_type.isascii()
                    or not addr_type.replace("-", "").isalnum()
                    or not xtext
                    or not is_xtext(xtext, utf8=utf8)
                ):
                    return Reply(501, "5.5.4", "Bad ORCPT parameter syntax")
                if not orcpt_carriable(addr_type, xtext):  # a decoded CR/LF would break the DSN
                    return Reply(501, "5.5.4", "Bad ORCPT parameter: control characters once decoded")
                orcpt = value
            else:
                return Reply(555, "5.5.4", f"Unsupported option: {key}")
        return notify, orcpt

    def _cmd_data(self, verb: str, arg: str) -> Event | None:
        if self.state is State.CONNECTED:
            return self._error(R_HELO_FIRST, verb, arg)
        if arg:
            return self._error(_SYNTAX[verb], verb, arg)
        tx = self.transaction
        if self.state is not State.MAIL or tx is None:
            return self._error(R_NEED_MAIL, verb, arg)
        if not tx.recipients:
            return self._error(R_NO_VALID_RCPT if tx.attempted else R_NEED_RCPT, verb, arg)
        return DataRequested()

    # -- DATA --------------------------------------------------------------------------------------
    def _start_data(self) -> None:
        self.state = State.DATA
        # The CRLF that ended the DATA command starts the first line: ".<CRLF>" right at the start is
        # the end (an empty message) and a dot there is a stuffed dot, like after any other CRLF.
        self._data_start = True
        self._data_size = 0
        self._data_error = None
        self._in_headers = True
        self._hdr_tail = CRLF  # the first header line starts right after that CRLF
        self._received = 0
        self._data_done = False

    def _next_data_event(self) -> Event | Sentinel:
        if self._data_done:
            self._data_done = False
            return self._finish_data()
        buf = self._buf
        if self._data_start:
            if buf[:3] == b".\r\n":
                del buf[:3]
                self._data_start = False
                return self._finish_data()
            if len(buf) < 3 and b".\r\n".startswith(buf):
                return NEED_DATA
        end = buf.find(_TERMINATOR)
        if end >= 0:
            cut = end + 2  # the CRLF before the dot belongs to the last line
            rest_from = end + len(_TERMINATOR)
        else:
            cut = len(buf) - _KEEP
            # never split "\r\n." across two chunks: a cut right after CR or CRLF moves before them
            if cut >= 2 and buf[cut - 2] == 13 and buf[cut - 1] == 10:
                cut -= 2
            elif cut >= 1 and buf[cut - 1] == 13:
                cut -= 1
            if cut <= 0:
                return NEED_DATA
            rest_from = cut
        if self._data_error is not None:
            chunk = b""  # refused already: read to the end, keep nothing
        else:
            with memoryview(buf) as view:
                region = bytes(view[:cut])
            chunk = self._scan(region)
        self._data_start = False
        del buf[:rest_from]
        if end < 0:
            return DataChunk(chunk) if chunk else NEED_DATA
        if chunk:
            self._data_done = True  # the last chunk first; the next call ends the message
            return DataChunk(chunk)
        return self._finish_data()

    def _scan(self, region: bytes) -> bytes:
        """Undo dot-stuffing, check for bare CR/LF/NUL, size and hop count; returns content to emit."""
        if self._data_start and region[:1] == b".":
            region = region[1:]  # a stuffed dot on the first line
        if b"\r\n." in region:
            region = region.replace(b"\r\n.", b"\r\n")
        crlf = region.count(b"\r\n")
        if region.count(b"\r") != crlf or region.count(b"\n") != crlf:
            self._data_error = R_BARE_NEWLINE
            return b""
        if b"\x00" in region:
            self._data_error = R_NUL
            return b""
        self._data_size += len(region)
        if self._data_size > self.config.max_message_size:
            self._data_error = R_TOO_BIG
            return b""
        if self._in_headers and region:
            self._count_received(region)
        return region

    def _count_received(self, region: bytes) -> None:
        # Find the end of the header section on the raw bytes (it may straddle the previous chunk), then
        # lower-case and count only the header part: a big body is never copied here.
        tail = self._hdr_tail
        joint = tail[-3:]
        j = (joint + region[:3]).find(b"\r\n\r\n")
        if j >= 0:
            header = region[: max(0, j + 2 - len(joint))]
            self._in_headers = False
        else:
            e = region.find(b"\r\n\r\n")
            if e >= 0:
                header = region[: e + 2]
                self._in_headers = False
            else:
                header = region
        text = tail + header.lower()
        self._received += text.count(_RECEIVED)
        self._hdr_tail = text[-(len(_RECEIVED) - 1) :]

    def _finish_data(self) -> Event:
        size = self._data_size
        error = self._data_error
        if error is None and self._received > self.config.max_received_headers:
            error = R_TOO_MANY_HOPS
        if error is not None:
            self._end_transaction()
            self._reply(error)
            return DataRejected(error, size)
        ev = DataComplete(size, self._received)
        self._pending = ev
        self.state = State.READY  # no more input belongs to this message; the decision ends it
        return ev


_Handler = Callable[[SmtpConnection, str, str], Event | None]


def _handlers() -> dict[str, _Handler]:
    c = SmtpConnection
    return {
        "EHLO": c._cmd_hello,
        "HELO": c._cmd_hello,
        "MAIL": c._cmd_mail,
        "RCPT": c._cmd_rcpt,
        "DATA": c._cmd_data,
        "RSET": c._cmd_rset,
        "NOOP": c._cmd_noop,
        "QUIT": c._cmd_quit,
        "VRFY": c._cmd_vrfy,
        "HELP": c._cmd_help,
        "STARTTLS": c._cmd_starttls,
    }


_HANDLERS: dict[str, _Handler] = _handlers()
