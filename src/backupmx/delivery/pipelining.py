"""Reading the replies to a pipelined command group (RFC 2920) on an aiosmtplib connection.

aiosmtplib (5.x, protocol.py) keeps one reply waiter: bytes that arrive while no command awaits a reply
are dropped, and a second reply already in its buffer is only parsed when more bytes come in. Replies a
primary sends together (as Postfix does for MAIL/RCPT/DATA) would be lost or wait forever. So for the
group, `GroupReplies` takes the transport over with a small protocol of its own that keeps every byte
and parses replies in order, then gives the transport back to aiosmtplib for the body.
"""

from __future__ import annotations

import asyncio
from typing import cast

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

MAX_REPLY = 32 * 1024  # one reply, all its lines: aiosmtplib's limit too; a peer cannot grow our memory


class GroupReplies(asyncio.Protocol):
    """Installed on the connection's transport with `take`, removed with `give_back`; meanwhile every
    byte the primary sends is kept here, and what the transport tells a protocol (flow control, EOF,
    connection lost) is passed on to aiosmtplib's protocol so that its state stays true."""

    def __init__(self, inner: SMTPProtocol) -> None:
        self._inner = inner
        self._transport = inner.transport
        self._buffer = bytearray()
        self._eof = False
        self._wakeup: asyncio.Future[None] | None = None

    @classmethod
    def take(cls, inner: SMTPProtocol) -> GroupReplies:
        reader = cls(inner)
        if reader._transport is None or reader._transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("connection lost before the command group")
        reader._transport.set_protocol(reader)
        return reader

    def give_back(self) -> bool:
        """aiosmtplib reads the next reply (to the final dot) again. False when bytes are left over
        here that no command asked for: the session is then out of step and must not be used on."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.set_protocol(self._inner)
        return not self._buffer

    # -- asyncio.Protocol ------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return bool(self._inner.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._transport = None
        self._wake()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    # -- replies ---------------------------------------------------------------------------------------
    async def read(self, timeout: float) -> tuple[int, str]:
        """The next reply: its code and its text (lines joined by LF, bytes that are not UTF-8 kept as
        surrogates, as aiosmtplib gives them: reply_from makes them readable). Raises aiosmtplib's
        errors: SMTPReadTimeoutError when no whole reply came within `timeout` (a reply that never
        ends), SMTPServerDisconnected, SMTPResponseException(-1) for what is not a reply."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            reply = self._parse()
            if reply is not None:
                return reply
            if self._eof:
                raise aiosmtplib.SMTPServerDisconnected("connection lost in the command group's replies")
            self._wakeup = loop.create_future()
            try:
                await asyncio.wait_for(self._wakeup, max(0.0, deadline - loop.time()))
            except TimeoutError as e:
                raise aiosmtplib.SMTPReadTimeoutError("timed out waiting for the primary's reply") from e
            finally:
                self._wakeup = None

    def _parse(self) -> tuple[int, str] | None:
        buf = self._buffer
        offset = 0
        lines: list[bytes] = []
        while True:
            end = buf.find(b"\n", offset)
            if end < 0:
                if len(buf) > MAX_REPLY:
                    raise aiosmtplib.SMTPResponseException(-1, "reply too long")
                return None
            line = bytes(buf[offset : end + 1])
            offset = end + 1
            code_text = line[:3]
            if not code_text.isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                raise aiosmtplib.SMTPResponseException(
                    -1, "malformed reply line: " + line.decode("utf-8", "surrogateescape")
                )
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del buf[:offset]
                text = b"\n".join(lines).decode("utf-8", "surrogateescape")
                return int(code_text), text
            if offset > MAX_REPLY:
                raise aiosmtplib.SMTPResponseException(-1, "reply too long")


def write_group(inner: SMTPProtocol, commands: list[bytes]) -> None:
    """All commands in one write (RFC 2920 §3.1: the group ends with DATA)."""
    transport = cast(asyncio.WriteTransport | None, inner.transport)
    if transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("connection lost before the command group")
    transport.write(b"".join(commands))
