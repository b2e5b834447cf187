"""The inbound SMTP server: a thin asyncio transport around the sans-IO protocol (protocol.py).

Each connection is an asyncio.Protocol feeding bytes to an SmtpConnection and one session task that
pumps its events, asks the policy checks, streams DATA into a BodyBuffer and commits to the spool. Replies
of a pipelined batch go out in one write. Limits: connections in total and per IP (421 4.7.0; the last
tenth of the total only for addresses without a session, so a few slow addresses cannot fill it), commands
per session, idle time between commands or DATA chunks (re-armed per chunk) and a cap on the whole
session (421 4.4.2). `250 ... queued as ID` is sent only after `spool.put_with_id` returned: the COMMIT
POINT. A spool failure answers 452 4.3.1 (full) or 451 4.3.0 (anything else) and never ends the server.
`stop(grace)` answers new connections and idle sessions 421 4.3.2, lets a transaction in DATA finish (its
commit and 250) within the grace time, then answers it 421; a commit in progress is never cut.
STARTTLS: plaintext sent after the command is dropped (injection defence); what arrives inside TLS together
with the client's Finished (asyncio hands it over before start_tls() returns) is kept. The mail log is
best-effort (maillog.py): a log that cannot be written never stops a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from pathlib import Path
from typing import cast

from backupmx.clock import Clock
from backupmx.config import Config, parse_hostport
from backupmx.errors import SpoolFullError
from backupmx.filter import ContentFilter
from backupmx.maillog import AddressList, MailLog
from backupmx.model import Envelope, MessageKind, QueueId, new_queue_id
from backupmx.policy import Check, HeaderFilter, HeaderStamp, SessionInfo, Stage, Verdict, run_checks
from backupmx.reply import DISK_FULL, SHUTTING_DOWN, SPOOL_FAILED, Reply
from backupmx.smtp.protocol import (
    CLOSED,
    NEED_DATA,
    DataChunk,
    DataComplete,
    DataRejected,
    DataRequested,
    Hello,
    MailFrom,
    ProtocolConfig,
    RcptTo,
    Rejected,
    SmtpConnection,
    StartTls,
    State,
)
from backupmx.smtp.received import protocol_name, received_header, tls_comment
from backupmx.spool import Spool
from backupmx.spool.body import BodyBuffer

log = logging.getLogger("backupmx.smtp")

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections")
CHECK_FAILED = Reply(451, "4.3.0", "Error: internal error, try again later")
# Input buffered before the session task has looked at it; beyond it, stop reading until the task waits
# for input again. Also during DATA: one event-loop turn may hand us 32 reads of 256 KiB (libuv), and
# every byte buffered here is copied again by the scanner, so this bounds a large message's footprint.
READ_HIGH_WATER = 1024 * 1024
DISK_CHECK_INTERVAL = 1.0
STOP_HARD_EXTRA = 10.0  # after the grace time, how long a commit in progress may still take
TLS_HANDSHAKE_TIMEOUT = 60.0
RESERVED_SHARE = 10  # 1/10 of max_connections is kept for client addresses with no session open

_STAGE_OF = {"MAIL": Stage.MAIL, "RCPT": Stage.RCPT, "DATA": Stage.DATA, "EHLO": Stage.HELO, "HELO": Stage.HELO}


@dataclass(frozen=True, slots=True)
class ServerStats:
    sessions_open: int
    sessions_total: int
    accepted: int  # messages committed (250 after DATA)
    rejected: int  # refusals of HELO/MAIL/RCPT/DATA/end of data, by policy or protocol
    connections_refused: int  # 421 at connect: limits or shutting down
    recipients_accepted: int
    bytes_accepted: int  # stored body bytes, Received header included
    spool_errors: int
    tls_sessions: int
    timeouts: int


class _Wake(Enum):
    INPUT = auto()
    EOF = auto()
    IDLE = auto()
    SESSION = auto()
    STOP = auto()


class _SessionEnd(Exception):
    """Ends a session at once (the transport is unusable)."""


@dataclass(slots=True)
class _Counters:
    sessions_total: int = 0
    accepted: int = 0
    rejected: int = 0
    connections_refused: int = 0
    recipients_accepted: int = 0
    bytes_accepted: int = 0
    spool_errors: int = 0
    tls_sessions: int = 0
    timeouts: int = 0


@dataclass(slots=True)
class _Data:
    queue_id: QueueId
    body: BodyBuffer
    failed: Reply | None = None
    filters: tuple[HeaderFilter, ...] = ()  # from the header stamps, applied to every chunk


class SmtpServer:
    def __init__(
        self,
        *,
        config: Config,
        spool: Spool,
        checks: Sequence[Check],
        maillog: MailLog,
        clock: Clock,
        tls_context: ssl.SSLContext | None = None,
        stamps: Sequence[HeaderStamp] = (),
    ) -> None:
        self.cfg = config
        self.spool = spool
        self.checks = list(checks)
        self.stamps = list(stamps)  # header fields prepended above our Received (policy.HeaderStamp)
        self.maillog = maillog
        self.clock = clock
        self.on_queued: Callable[[QueueId, frozenset[str]], None] | None = None
        # Before the commit, may return the envelope with another kind (the canary marks its own messages,
        # backupmx.monitor.canary); it must not raise for ordinary input and must leave the body as it is.
        self.classify: Callable[[Envelope, BodyBuffer], Envelope] | None = None
        self.content_filter: ContentFilter | None = None  # asked after the final dot, before the commit
        self._tls_context = tls_context
        s = config.server
        self._idle = s.idle_timeout.total_seconds()
        self._session_cap = s.session_timeout.total_seconds()
        self._greeting_delay = s.greeting_delay.total_seconds()
        self._tmp_dir: Path | None = s.data_dir / "tmp"
        self._servers: list[asyncio.Server] = []
        self._sessions: set[_Session] = set()
        self._per_ip: dict[str, int] = {}
        self._stopping = False
        self._grace_expired = False
        self._stopped = False
        self._n = _Counters()
        self._disk_checked = float("-inf")
        self._disk_ok = True
        self.bound: list[tuple[str, int]] = []
        self._proto_base = ProtocolConfig(
            hostname=s.hostname,
            max_message_size=s.max_message_size,
            max_recipients=s.max_recipients,
            max_commands=s.max_commands,
            max_received_headers=s.max_received_headers,
            postmaster_domain=config.domains[0].name if config.domains else "",
            forbid_early_pipelining=s.forbid_early_pipelining,
        )
        self._proto_tls = dataclasses.replace(self._proto_base, tls_available=True)

    # -- public API --------------------------------------------------------------------------------
    async def start(self) -> None:
        """bind() then serve()."""
        await self.bind()
        await self.serve()

    async def bind(self) -> None:
        """Bind every configured listener (port 0 = ephemeral) without accepting anything yet: a client
        that connects now is refused by the kernel, so a start that fails later answered nobody. Raises
        OSError when one cannot be bound (an IPv6 listener on a host without IPv6 is skipped with a
        warning); then none stays bound."""
        try:
            assert self._tmp_dir is not None
            self._tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("cannot create %s (%s): message bodies buffer in the system temp dir", self._tmp_dir, e)
            self._tmp_dir = None
        loop = asyncio.get_running_loop()
        for item in self.cfg.server.listen:
            host, port = parse_hostport(item)
            try:
                srv = await loop.create_server(
                    lambda: _Session(self), host or None, port, reuse_address=True, backlog=1024, start_serving=False
                )
            except OSError as e:
                if ":" in host and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    log.warning("listener %s skipped: %s", item, e.strerror)
                    continue
                await self._close_listeners()
                raise OSError(e.errno, f"smtp listener {item}: {e.strerror or e}") from e
            self._servers.append(srv)
            for sock in srv.sockets:
                addr = sock.getsockname()
                self.bound.append((str(addr[0]), int(addr[1])))

    async def serve(self) -> None:
        """Start accepting on the listeners bind() made."""
        for srv in self._servers:
            await srv.start_serving()
        log.info("smtp listening on %s", " ".join(f"{h}:{p}" for h, p in self.bound))

    def statistics(self) -> ServerStats:
        n = self._n
        return ServerStats(
            sessions_open=len(self._sessions),
            sessions_total=n.sessions_total,
            accepted=n.accepted,
            rejected=n.rejected,
            connections_refused=n.connections_refused,
            recipients_accepted=n.recipients_accepted,
            bytes_accepted=n.bytes_accepted,
            spool_errors=n.spool_errors,
            tls_sessions=n.tls_sessions,
            timeouts=n.timeouts,
        )

    def set_tls_context(self, ctx: ssl.SSLContext | None) -> None:
        """New sessions use `ctx` (None: STARTTLS no longer offered); sessions in TLS keep theirs."""
        self._tls_context = ctx

    async def stop(self, grace: float = 30.0) -> None:
        if self._stopped:
            return
        self._stopping = True
        self._wake_all()
        tasks = [s.task for s in list(self._sessions) if s.task is not None]
        pending: set[asyncio.Task[None]] = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, grace))
        if pending:
            self._grace_expired = True  # sessions still reading DATA get 421 now
            self._wake_all()
            _, pending = await asyncio.wait(pending, timeout=STOP_HARD_EXTRA)
            for t in pending:
                log.warning("stop: a session did not finish in time; cancelled")
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=STOP_HARD_EXTRA)
        await self._close_listeners()
        self._stopped = True

    # -- internals ---------------------------------------------------------------------------------
    async def _close_listeners(self) -> None:
        for srv in self._servers:
            srv.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), timeout=1.0)
        self._servers.clear()

    def _wake_all(self) -> None:
        for s in list(self._sessions):
            s.wake(_Wake.STOP)

    def _protocol_config(self) -> ProtocolConfig:
        return self._proto_tls if self._tls_context is not None else self._proto_base

    def _admit(self, session: _Session, ip: str) -> Reply | None:
        if self._stopping:
            return SHUTTING_DOWN
        s = self.cfg.server
        held = self._per_ip.get(ip, 0)
        if len(self._sessions) >= s.max_connections or held >= s.max_connections_per_ip:
            return TOO_MANY_CONNECTIONS
        # the last tenth of the slots only for addresses that hold none: slow clients from a few
        # addresses (one byte a second in DATA until session_timeout) cannot keep a new sender out
        if held and len(self._sessions) >= s.max_connections - max(1, s.max_connections // RESERVED_SHARE):
            return TOO_MANY_CONNECTIONS
        self._sessions.add(session)
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self._n.sessions_total += 1
        return None

    def _release(self, session: _Session) -> None:
        if session in self._sessions:
            self._sessions.discard(session)
            left = self._per_ip.get(session.client_ip, 1) - 1
            if left > 0:
                self._per_ip[session.client_ip] = left
            else:
                self._per_ip.pop(session.client_ip, None)

    def _disk_has_room(self) -> bool:
        """Free space in data_dir >= server.min_free_disk (statvfs, looked at most once a second)."""
        now = time.monotonic()
        if now - self._disk_checked < DISK_CHECK_INTERVAL:
            return self._disk_ok
        self._disk_checked = now
        try:
            st = os.statvfs(self.cfg.server.data_dir)
        except OSError:
            self._disk_ok = True  # cannot tell: the spool's own ENOSPC handling still answers 452
            return True
        self._disk_ok = st.f_bavail * st.f_frsize >= self.cfg.server.min_free_disk
        return self._disk_ok


def _client_ip(peer: object) -> tuple[str, int]:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = str(peer[0]), int(peer[1])
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return host, port
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped), port
        return str(addr), port
    return "unknown", 0


class _Session(asyncio.Protocol):
    """One connection: the asyncio callbacks feed the protocol; `_run` (one task) drives it."""

    def __init__(self, server: SmtpServer) -> None:
        self.server = server
        self.task: asyncio.Task[None] | None = None
        self.client_ip = ""
        self.client_port = 0
        self._transport: asyncio.Transport | None = None
        self._tls_context = server._tls_context  # fixed for the session: what EHLO offered is what we do
        self._conn = SmtpConnection(server._protocol_config())
        self._info = SessionInfo(client_ip="")
        self._waiter: asyncio.Future[_Wake] | None = None
        self._eof = False
        self._reading_paused = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._data: _Data | None = None
        self._deadline = 0.0
        self._queued = 0
        self._rejected = 0
        self._tls_info: str | None = None  # "using TLSv1.3 with cipher ..." for the Received header
        # Set while loop.start_tls() runs: from that call on, every byte reaching data_received came through
        # the TLS layer (decrypted, after the handshake), so it is kept here, not dropped as plaintext.
        self._tls_early: bytearray | None = None

    # -- asyncio.Protocol callbacks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, so no isinstance check here
        self._transport = cast(asyncio.Transport, transport)
        self.client_ip, self.client_port = _client_ip(transport.get_extra_info("peername"))
        refusal = self.server._admit(self, self.client_ip)
        if refusal is not None:
            self.server._n.connections_refused += 1
            self.server.maillog.event("reject", stage="connect", client=self.client_ip, reply=str(refusal))
            self._transport.write(refusal.to_bytes())
            transport.close()
            self._conn.send_and_close(refusal)
            self._conn.data_to_send()
            return
        self._info = SessionInfo(client_ip=self.client_ip, client_port=self.client_port)
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.server._session_cap
        # owned by the server: stop() waits for it
        self.task = loop.create_task(self._run(), name=f"smtp {self.client_ip}:{self.client_port}")

    def data_received(self, data: bytes) -> None:
        early = self._tls_early
        if early is not None:
            # asyncio hands over what arrived with the client's Finished before start_tls() returns; at
            # most one read's worth (the handshake ends in that read), so this stays small
            early += data
            return
        self._conn.receive_data(data)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(_Wake.INPUT)
        if self._conn.buffered > READ_HIGH_WATER and not self._reading_paused and self._transport:
            self._reading_paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        self._eof = True
        self.wake(_Wake.EOF)
        # A client that half-closes after pipelining its commands still gets its replies: keep the
        # transport open for writing (not possible, nor needed, under TLS).
        return not self._conn.tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self.wake(_Wake.EOF)
        d = self._drain_waiter
        if d is not None and not d.done():
            d.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        d = self._drain_waiter
        if d is not None and not d.done():
            d.set_result(None)

    def wake(self, why: _Wake) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(why)

    # -- the session -------------------------------------------------------------------------------
    async def _run(self) -> None:
        srv = self.server
        conn = self._conn
        try:
            srv.maillog.event("connect", client=self.client_ip)  # never raises; inside the try all the same
            verdict = await self._ask(Stage.CONNECT, None)
            if verdict.refuses:
                self._log_reject(Stage.CONNECT, verdict.reply or CHECK_FAILED, verdict.log_reason)
                conn.greet(verdict.reply or CHECK_FAILED)
            else:
                if srv._greeting_delay > 0 and not srv._stopping:
                    loop = asyncio.get_running_loop()
                    wake = await self._wait(loop.time() + srv._greeting_delay, idle=False)
                    if conn.talked_early:
                        log.info("client %s talked before the greeting", self.client_ip)
                        self._log_reject(Stage.CONNECT, Reply(554, "5.5.1", "talked before greeting"), "pregreet")
                    elif wake is _Wake.EOF:
                        return
                conn.greet(
                    SHUTTING_DOWN if srv._stopping else Reply(220, "", f"{srv.cfg.server.hostname} ESMTP"),
                    reject_early_talkers=srv._greeting_delay > 0,
                )
            await self._pump()
        except _SessionEnd:
            pass
        except Exception:
            log.exception("session %s: unexpected error", self.client_ip)
            if conn.state is not State.CLOSED:
                conn.send_and_close(Reply(421, "4.3.0", "Error: internal error, closing connection"))
        finally:
            if self._data is not None:
                self._data.body.close()
                self._data = None
            self._flush()
            if self._transport is not None:
                self._transport.close()
            srv._release(self)
            srv.maillog.event(
                "disconnect",
                client=self.client_ip,
                commands=conn.commands,
                queued=self._queued,
                rejected=self._rejected,
            )

    async def _pump(self) -> None:
        conn = self._conn
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                await self._flush_and_wait()
            elif ev is CLOSED:
                return
            elif isinstance(ev, DataChunk):
                self._on_chunk(ev)
            elif isinstance(ev, RcptTo):
                await self._on_rcpt(ev)
            elif isinstance(ev, MailFrom):
                await self._on_mail(ev)
            elif isinstance(ev, DataRequested):
                await self._on_data(ev)
            elif isinstance(ev, DataComplete):
                await self._on_data_complete(ev)
            elif isinstance(ev, DataRejected):
                self._on_data_rejected(ev)
            elif isinstance(ev, Hello):
                await self._on_hello(ev)
            elif isinstance(ev, Rejected):
                tx = conn.transaction
                self._info.sender = tx.sender if tx is not None else None
                self._log_reject(_STAGE_OF.get(ev.command, Stage.CONNECT), ev.reply, "protocol", argument=ev.argument)
            elif isinstance(ev, StartTls):
                await self._start_tls()

    def _flush(self) -> None:
        out = self._conn.data_to_send()
        t = self._transport
        if out and t is not None and not t.is_closing():
            t.write(out)

    async def _flush_and_wait(self) -> None:
        """Send what is pending, then wait for input; ends the session (via the protocol) on timeout,
        shutdown or EOF."""
        srv = self.server
        conn = self._conn
        self._flush()
        loop = asyncio.get_running_loop()
        if self._writing_paused and not self._eof:
            self._drain_waiter = loop.create_future()
            try:
                await asyncio.wait_for(self._drain_waiter, timeout=srv._idle)
            except TimeoutError:
                self._timeout(_Wake.IDLE)
                return
            finally:
                self._drain_waiter = None
        while True:
            if srv._stopping and (conn.idle or (srv._grace_expired and conn.state is State.DATA)):
                conn.send_and_close(SHUTTING_DOWN)
                return
            if self._eof:
                raise _SessionEnd
            wake = await self._wait(min(loop.time() + srv._idle, self._deadline))
            if wake is _Wake.INPUT:
                return
            if wake in (_Wake.IDLE, _Wake.SESSION):
                self._timeout(wake)
                return
            # EOF and STOP: look again at the top

    def _timeout(self, wake: _Wake) -> None:
        self.server._n.timeouts += 1
        what = "session too long" if wake is _Wake.SESSION else "timeout exceeded"
        log.info("client %s: %s", self.client_ip, what)
        self._conn.send_and_close(Reply(421, "4.4.2", f"{self.server.cfg.server.hostname} Error: {what}"))

    async def _wait(self, deadline: float, *, idle: bool = True) -> _Wake:
        loop = asyncio.get_running_loop()
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        fut: asyncio.Future[_Wake] = loop.create_future()
        self._waiter = fut
        timer = loop.call_at(deadline, self._on_timer, fut, idle)
        try:
            return await fut
        finally:
            timer.cancel()
            self._waiter = None

    def _on_timer(self, fut: asyncio.Future[_Wake], idle: bool) -> None:
        if not fut.done():
            if not idle:
                fut.set_result(_Wake.IDLE)
            else:
                late = asyncio.get_running_loop().time() >= self._deadline
                fut.set_result(_Wake.SESSION if late else _Wake.IDLE)

    # -- policy ------------------------------------------------------------------------------------
    async def _ask(self, stage: Stage, address: str | None) -> Verdict:
        if not self.server.checks:
            return Verdict.accept()
        try:
            return await run_checks(self.server.checks, stage, self._info, address)
        except Exception:
            # an unknown error means "try again", never a rejection (policy/__init__.py)
            log.exception("policy check failed at %s for %s", stage, self.client_ip)
            return Verdict.defer(CHECK_FAILED, log_reason="check error")

    def _log_reject(
        self, stage: Stage, reply: Reply, reason: str = "", *, recipient: str | None = None, argument: str | None = None
    ) -> None:
        self._rejected += 1
        self.server._n.rejected += 1
        info = self._info
        tx = self._conn.transaction
        sender = tx.sender if tx is not None else info.sender if stage is Stage.MAIL else None
        self.server.maillog.event(
            "reject",
            stage=stage.value,
            client=self.client_ip,
            helo=info.helo or None,
            sender=None if sender is None else f"<{sender}>",
            recipient=None if recipient is None else f"<{recipient}>",
            command=argument[:200] if argument else None,
            reply=str(reply),
            reason=reason or None,
        )

    # -- events ------------------------------------------------------------------------------------
    async def _on_hello(self, ev: Hello) -> None:
        self._info.helo = ev.name
        self._info.sender = None
        self._info.recipients = []
        verdict = await self._ask(Stage.HELO, None)
        if verdict.refuses:
            reply = verdict.reply or CHECK_FAILED
            self._log_reject(Stage.HELO, reply, verdict.log_reason)
            self._conn.refuse(reply)
        else:
            self._conn.accept()

    async def _on_mail(self, ev: MailFrom) -> None:
        srv = self.server
        if srv._stopping:
            self._conn.send_and_close(SHUTTING_DOWN)
            return
        self._info.sender = ev.sender
        self._info.recipients = []
        p = ev.params
        self._info.smtputf8, self._info.body_type, self._info.size = p.smtputf8, p.body_type, p.size
        if not srv._disk_has_room():
            self._log_reject(Stage.MAIL, DISK_FULL, "min_free_disk")
            self._conn.refuse(DISK_FULL)
            self._info.sender = None
            return
        verdict = await self._ask(Stage.MAIL, ev.sender)
        if verdict.refuses:
            reply = verdict.reply or CHECK_FAILED
            self._log_reject(Stage.MAIL, reply, verdict.log_reason)
            self._info.sender = None
            self._conn.refuse(reply)
        else:
            self._conn.accept()

    async def _on_rcpt(self, ev: RcptTo) -> None:
        address = ev.recipient.address
        verdict = await self._ask(Stage.RCPT, address)
        if verdict.refuses:
            reply = verdict.reply or CHECK_FAILED
            self._log_reject(Stage.RCPT, reply, verdict.log_reason, recipient=address)
            self._conn.refuse(reply)
        else:
            self._info.recipients.append(address)
            self._conn.accept()

    async def _on_data(self, ev: DataRequested) -> None:
        srv = self.server
        verdict = await self._ask(Stage.DATA, None)
        if verdict.refuses:
            reply = verdict.reply or CHECK_FAILED
            self._log_reject(Stage.DATA, reply, verdict.log_reason)
            self._conn.refuse(reply)
            return
        tx = self._conn.transaction
        assert tx is not None
        stamped, filters = await self._stamp()
        now = srv.clock.now()
        qid = new_queue_id(now)  # chosen before storing: the Received header names it
        body = BodyBuffer(srv._tmp_dir)
        self._data = _Data(qid, body, filters=filters)
        header = received_header(
            helo=self._conn.helo or "",
            client_ip=self.client_ip,
            hostname=srv.cfg.server.hostname,
            node=srv.cfg.server.node,
            protocol=protocol_name(extended=self._conn.extended, tls=self._conn.tls, smtputf8=tx.params.smtputf8),
            queue_id=qid,
            recipients=[r.address for r in tx.recipients],
            when=now,
            tls=self._tls_info if self._conn.tls else None,
        )
        self._write_body(stamped + header)
        self._conn.accept()

    async def _stamp(self) -> tuple[bytes, tuple[HeaderFilter, ...]]:
        """Header fields from the stamps (Authentication-Results, ...), and their filters. A failing
        stamp is logged and skipped: it never costs a message."""
        fields: list[bytes] = []
        filters: list[HeaderFilter] = []
        for stamp in self.server.stamps:
            try:
                got = await stamp.stamp(self._info)
            except Exception:
                log.exception("header stamp %s failed for %s", getattr(stamp, "name", stamp), self.client_ip)
                continue
            fields.append(got.headers)
            if got.filter is not None:
                filters.append(got.filter)
        return b"".join(fields), tuple(filters)

    def _write_body(self, data: bytes) -> None:
        d = self._data
        if d is None or d.failed is not None:
            return
        try:
            d.body.write(data)
        except OSError as e:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            log.error("client %s: cannot buffer the message body: %s", self.client_ip, e)
            d.failed = DISK_FULL if full else SPOOL_FAILED

    def _on_chunk(self, ev: DataChunk) -> None:
        data = ev.data
        if self._data is not None:
            for f in self._data.filters:
                data = f.feed(data)
        self._write_body(data)

    def _finish_filters(self) -> None:
        """The end of DATA: what the stamps' filters still hold goes into the body, in chain order."""
        d = self._data
        if d is None or not d.filters:
            return
        tail = b""
        for f in d.filters:
            tail = (f.feed(tail) if tail else b"") + f.finish()
        self._write_body(tail)

    def _on_data_rejected(self, ev: DataRejected) -> None:
        if self._data is not None:
            self._data.body.close()
            self._data = None
        self._log_reject(Stage.EOM, ev.reply, "content")

    async def _on_data_complete(self, ev: DataComplete) -> None:
        srv = self.server
        conn = self._conn
        data = self._data
        tx = conn.transaction
        assert data is not None and tx is not None
        self._finish_filters()
        self._data = None
        handed_over = False
        try:
            if data.failed is not None:
                srv._n.spool_errors += 1
                self._log_reject(Stage.EOM, data.failed, "body buffer")
                conn.refuse(data.failed)
                return
            verdict = await self._ask(Stage.EOM, None)
            if verdict.refuses:
                reply = verdict.reply or CHECK_FAILED
                self._log_reject(Stage.EOM, reply, verdict.log_reason)
                conn.refuse(reply)
                return
            if srv.content_filter is not None:  # rspamd (backupmx.filter): may refuse, or edit the stored copy
                screening = await srv.content_filter.screen(self._info, data.queue_id, data.body, srv._tmp_dir)
                data.body = screening.body
                if screening.refusal is not None:
                    self._log_reject(Stage.EOM, screening.refusal.reply, screening.refusal.log_reason)
                    conn.refuse(screening.refusal.reply)
                    return
            envelope = Envelope(
                sender=tx.sender,
                recipients=tuple(tx.recipients),
                body_type=tx.params.body_type,
                smtputf8=tx.params.smtputf8,
                ret=tx.params.ret,
                envid=tx.params.envid,
                client_ip=self.client_ip,
                client_helo=conn.helo or "",
            )
            if srv.classify is not None:
                try:
                    envelope = srv.classify(envelope, data.body)
                except Exception:
                    log.exception("classifying %s failed: stored as user mail", data.queue_id)
            put = asyncio.ensure_future(srv.spool.put_with_id(data.queue_id, envelope, data.body))
            try:
                # COMMIT POINT: once put_with_id returns, the message is on stable storage and ours.
                await asyncio.shield(put)
            except asyncio.CancelledError:
                handed_over = True  # the put goes on; the body is closed when it is done
                put.add_done_callback(lambda _f: data.body.close())
                raise
            except SpoolFullError as e:
                srv._n.spool_errors += 1
                log.error("spool full: %s", e)
                self._log_reject(Stage.EOM, DISK_FULL, "spool full")
                conn.refuse(DISK_FULL)
                return
            except Exception:
                srv._n.spool_errors += 1
                log.exception("spool error for %s from %s", data.queue_id, self.client_ip)
                self._log_reject(Stage.EOM, SPOOL_FAILED, "spool error")
                conn.refuse(SPOOL_FAILED)
                return
            conn.accept(Reply(250, "2.0.0", f"Ok: queued as {data.queue_id}"))
            size = data.body.size
            self._queued += 1
            srv._n.accepted += 1
            srv._n.recipients_accepted += len(tx.recipients)
            srv._n.bytes_accepted += size
            srv.maillog.event(
                "queued",
                data.queue_id,
                client=self.client_ip,
                helo=conn.helo or "",
                size=size,
                nrcpt=len(tx.recipients),
                to=AddressList(r.address for r in tx.recipients),
                kind=None if envelope.kind is MessageKind.USER else envelope.kind.value,
                **{"from": f"<{tx.sender}>"},
            )
            if srv.on_queued is not None:
                try:
                    srv.on_queued(data.queue_id, frozenset(r.domain for r in tx.recipients))
                except Exception:
                    log.exception("on_queued callback failed")
        finally:
            self._info.sender = None
            self._info.recipients = []
            if not handed_over:
                data.body.close()

    async def _start_tls(self) -> None:
        self._flush()
        ctx = self._tls_context
        if ctx is None or self._transport is None:
            raise _SessionEnd
        loop = asyncio.get_running_loop()
        # Plaintext that came before this point was dropped by the protocol (STARTTLS injection defence);
        # start_tls() moves the socket to the TLS layer before it first yields, so what reaches
        # data_received from here on was sent inside TLS.
        self._tls_early = bytearray()
        try:
            transport = await loop.start_tls(
                self._transport,
                self,
                ctx,
                server_side=True,
                ssl_handshake_timeout=min(self.server._idle, TLS_HANDSHAKE_TIMEOUT),
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            log.info("client %s: TLS handshake failed: %s", self.client_ip, e)
            raise _SessionEnd from None
        finally:
            early, self._tls_early = self._tls_early, None
        if transport is None:
            raise _SessionEnd
        self._transport = transport
        self._conn.tls_established()
        if early:
            self.data_received(bytes(early))  # e.g. EHLO in the same segment as the client's Finished
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            cipher = ssl_object.cipher()
            self._tls_info = tls_comment(
                ssl_object.version(), cipher[0] if cipher else None, cipher[2] if cipher else None
            )
            self._info.tls_version, self._info.tls_cipher = ssl_object.version() or "", cipher[0] if cipher else ""
        else:
            self._tls_info = tls_comment(None, None, None)
        self.server._n.tls_sessions += 1
        self._info.tls = True
        self._info.helo = ""
        self._info.sender = None
        self._info.recipients = []


__all__ = ["ServerStats", "SmtpServer"]
