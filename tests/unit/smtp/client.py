"""A raw SMTP client for socket tests: bytes exactly as given, every read bounded in time."""

from __future__ import annotations

import asyncio
import ssl

TIMEOUT = 10.0


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.lines: list[str] = []

    @classmethod
    async def connect(cls, port: int, *, host: str = "127.0.0.1", banner: bool = True) -> Client:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
        c = cls(r, w)
        if banner:
            b = await c.reply()
            assert b.startswith("220 "), b
        return c

    async def reply(self) -> str:
        """One whole reply; returns its last line ("250 2.0.0 Ok")."""
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
            if not raw:
                raise ConnectionError(f"closed; lines so far: {self.lines[-5:]}")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return line

    async def replies(self, n: int) -> list[str]:
        return [await self.reply() for _ in range(n)]

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), TIMEOUT)

    async def cmd(self, line: str | bytes) -> str:
        await self.send(line.encode() + b"\r\n" if isinstance(line, str) else line + b"\r\n")
        return await self.reply()

    async def ehlo(self, name: str = "client.test") -> str:
        return await self.cmd(f"EHLO {name}")

    async def send_mail(
        self, body: bytes, *, sender: str = "s@sender.test", rcpts: tuple[str, ...] = ("alice@example.test",)
    ) -> str:
        """MAIL/RCPT/DATA pipelined; body given unstuffed with CRLF line ends; returns the final reply."""
        stuffed = body.replace(b"\r\n.", b"\r\n..")
        if stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        wire = f"MAIL FROM:<{sender}>\r\n".encode()
        wire += b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
        await self.send(wire + b"DATA\r\n")
        replies = await self.replies(2 + len(rcpts))
        if not replies[-1].startswith("354"):
            return replies[-1]
        await self.send(stuffed + b".\r\n")
        return await self.reply()

    async def read_to_close(self) -> bytes:
        """What comes until the server closes. A reset (the server closed with our bytes unread) counts
        as a close; lines that arrived before it are still returned."""
        out = b""
        while True:
            try:
                line = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
            except ConnectionResetError:
                return out
            if not line:
                return out
            out += line

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        await asyncio.wait_for(self.writer.start_tls(ctx, server_hostname="mx.test"), TIMEOUT)

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)
        except (ConnectionError, TimeoutError, ssl.SSLError):
            pass
