"""Test primaries on 127.0.0.1 with ephemeral ports, in the test's own event loop.

`Primary` is aiosmtpd with programmable replies (per MAIL, per RCPT, after the dot), delays, a drop
in the middle of DATA, optional DSN support, and a count of concurrent sessions. `BlackHole` accepts
TCP and never says a word; `closed_port()` is a port with nothing listening.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    dsn_mail: dict[str, str] = field(default_factory=dict)
    dsn_rcpt: dict[str, dict[str, str]] = field(default_factory=dict)


RcptRule = Callable[[str], str | None]  # address -> reply line, or None for 250
DataRule = Callable[[Envelope], Awaitable[str | None]]  # -> reply line, or None for 250


class _Handler:
    def __init__(self, primary: Primary) -> None:
        self.p = primary

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.p.dsn:
            responses.insert(len(responses) - 1, "250-DSN")
        if self.p.pipelining:  # aiosmtpd reads pipelined commands fine; it just does not say so
            responses.insert(len(responses) - 1, "250-PIPELINING")
        if self.p.drop_extensions:
            responses = [r for r in responses if not any(x in r for x in self.p.drop_extensions)]
            last = responses[-1]
            responses[-1] = "250 " + last[4:]
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.p.mail_reply:
            return self.p.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self.p.rcpt_rule is not None:
            reply = self.p.rcpt_rule(address)
            if reply is not None:
                return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.p.data_started += 1
        if self.p.data_delay:
            await asyncio.sleep(self.p.data_delay)
        if self.p.drop_in_data:
            assert server.transport is not None
            server.transport.abort()
            return "451 never sent"
        if self.p.data_rule is not None:
            reply = await self.p.data_rule(envelope)
            if reply is not None:
                return reply
        content = envelope.original_content or b""
        assert isinstance(envelope.mail_from, str)
        self.p.received.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                bytes(content),
                list(envelope.mail_options),
                dict(getattr(server, "dsn_mail", {})),
                dict(getattr(server, "dsn_rcpt", {})),
            )
        )
        self.p.delivered_event.set()
        return "250 2.0.0 Ok: queued as FAKE"


def _split_params(arg: str, names: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    keep: list[str] = []
    found: dict[str, str] = {}
    for i, word in enumerate(arg.split(" ")):
        key, _, value = word.partition("=")
        if i > 0 and key.upper() in names:
            found[key.upper()] = value
        else:
            keep.append(word)
    return " ".join(keep), found


class _SMTP(SMTP):
    """aiosmtpd answers 555 to every RCPT parameter and to RET/ENVID; for a DSN-capable primary we
    take those parameters off before aiosmtpd sees them, and remember them."""

    def __init__(self, primary: Primary, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._primary = primary
        self.dsn_mail: dict[str, str] = {}
        self.dsn_rcpt: dict[str, dict[str, str]] = {}
        self._mailer = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._primary._session_started()
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._primary._session_ended()
        if self._mailer:
            self._primary._mail_session_ended()
        super().connection_lost(exc)

    async def smtp_MAIL(self, arg: str) -> None:
        if not self._mailer:
            self._mailer = True
            self._primary._mail_session_started()
        if self._primary.dsn and arg:
            arg, self.dsn_mail = _split_params(arg, ("RET", "ENVID"))
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        if self._primary.dsn and arg:
            arg, params = _split_params(arg, ("NOTIFY", "ORCPT"))
            addr = arg.partition(":")[2].strip().split(" ")[0].strip("<>")
            self.dsn_rcpt[addr] = params
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        if self._primary.data_command_reply:
            await self.push(self._primary.data_command_reply)
            return
        await super().smtp_DATA(arg)


class Primary:
    def __init__(
        self,
        *,
        dsn: bool = False,
        smtputf8: bool = True,
        hostname: str = "primary.test",
        tls_context: ssl.SSLContext | None = None,
        pipelining: bool = False,
    ) -> None:
        self.tls_context = tls_context
        self.pipelining = pipelining
        self.dsn = dsn
        self.smtputf8 = smtputf8
        self.hostname = hostname
        self.received: list[Received] = []
        self.rcpt_rule: RcptRule | None = None
        self.data_rule: DataRule | None = None
        self.mail_reply: str | None = None
        self.data_command_reply: str | None = None
        self.data_delay = 0.0
        self.drop_in_data = False
        self.drop_extensions: tuple[str, ...] = ()
        self.data_started = 0
        self.sessions = 0
        self.active = 0
        self.max_active = 0
        self.active_history: list[int] = []
        self.mail_sessions = 0  # sessions that sent MAIL: deliveries, not probes
        self.mail_active = 0
        self.mail_max = 0
        self.mail_history: list[int] = []
        self.delivered_event = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    def _session_started(self) -> None:
        self.sessions += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.active_history.append(self.active)

    def _session_ended(self) -> None:
        self.active -= 1

    def _mail_session_started(self) -> None:
        """A session that sent MAIL (a delivery, not a health probe)."""
        self.mail_sessions += 1
        self.mail_active += 1
        self.mail_max = max(self.mail_max, self.mail_active)
        self.mail_history.append(self.mail_active)

    def _mail_session_ended(self) -> None:
        self.mail_active -= 1

    async def start(self, port: int = 0) -> Primary:
        loop = asyncio.get_running_loop()
        handler = _Handler(self)

        def factory() -> _SMTP:
            return _SMTP(
                self,
                handler,
                hostname=self.hostname,
                enable_SMTPUTF8=self.smtputf8,
                decode_data=False,
                data_size_limit=100_000_000,
                loop=loop,
                tls_context=self.tls_context,
            )

        self._server = await loop.create_server(factory, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            await asyncio.sleep(0)

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def contents(self) -> list[bytes]:
        return [r.content for r in self.received]

    def deliveries(self) -> list[tuple[str, bytes]]:
        """(recipient, content) for every recipient of every accepted transaction."""
        return [(rcpt, r.content) for r in self.received for rcpt in r.rcpt_tos]


class Greeter:
    """Answers every connection with one fixed banner line (e.g. 421 or 554) and closes."""

    def __init__(self, line: str) -> None:
        self.line = line
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Greeter:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(self.line.encode() + b"\r\n")
            await writer.drain()
            writer.close()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


class BlackHole:
    """Accepts TCP connections (the kernel completes the handshake) and never answers."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(100)
        self.port = self._sock.getsockname()[1]

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def self_signed(directory: Path, name: str = "primary.test") -> tuple[Path, ssl.SSLContext]:
    """A self-signed certificate for `name` and 127.0.0.1 (openssl CLI), and a server context."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName=DNS:{name},IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return cert, ctx
