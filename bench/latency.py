"""Per-message latency, which smtp-source does not report: an asyncio SMTP client that sends one message
per session from `concurrency` workers and times each message twice: `total` from connect to the 250
after the final dot (what a sending MTA waits for), `commit` from the final dot written to that 250
(the server's store-and-fsync). Lock-step SMTP, no PIPELINING, same for every server under test.
A reply other than the expected one, a timeout or a refused connection is an error, not a sample."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field


@dataclass
class LatencyRun:
    total: list[float] = field(default_factory=list)  # seconds per message
    commit: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def sent(self) -> int:
        return len(self.total)


class _Unexpected(Exception):
    pass


def make_message(size_bytes: int, seq: int, *, sender: str, recipient: str) -> bytes:
    """Headers, then lines of 78 'X' + CRLF up to about `size_bytes` of payload (like smtp-source)."""
    head = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: latency probe {seq}\r\n"
        f"Message-ID: <{seq}.{time.time_ns()}@latency.test>\r\n\r\n"
    ).encode()
    line = b"X" * 78 + b"\r\n"
    n, rest = divmod(size_bytes, len(line))
    body = line * n + (b"X" * max(0, rest - 2) + b"\r\n" if rest > 2 else b"")
    return head + body


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise _Unexpected("connection closed")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    return int(lines[-1][:3]), b"".join(lines)


async def _expect(reader: asyncio.StreamReader, code: int, what: str) -> None:
    got, text = await _reply(reader)
    if got != code:
        raise _Unexpected(f"{what}: {text[:200]!r}")


async def one_message(
    host: str, port: int, message: bytes, *, sender: str, recipient: str, helo: str = "latency.test"
) -> tuple[float, float]:
    """One session, one message; returns (total, commit) seconds."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 16)
    try:
        await _expect(reader, 220, "greeting")
        writer.write(f"EHLO {helo}\r\n".encode())
        await _expect(reader, 250, "EHLO")
        writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
        await _expect(reader, 250, "MAIL")
        writer.write(f"RCPT TO:<{recipient}>\r\n".encode())
        await _expect(reader, 250, "RCPT")
        writer.write(b"DATA\r\n")
        await _expect(reader, 354, "DATA")
        writer.write(message)
        writer.write(b".\r\n")
        await writer.drain()
        t1 = time.perf_counter()
        await _expect(reader, 250, "end of data")
        t2 = time.perf_counter()
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(_Unexpected, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(_reply(reader), 5)
        return t2 - t0, t2 - t1
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)


async def run_latency(
    host: str,
    port: int,
    *,
    messages: int,
    concurrency: int,
    size_bytes: int,
    sender: str = "sender@source.test",
    recipient: str = "alice@example.test",
    per_message_timeout: float = 60.0,
    overall_timeout: float = 600.0,
) -> LatencyRun:
    """Send `messages` messages over `concurrency` parallel sessions; stop early after
    `overall_timeout` seconds (then fewer samples than messages: check `sent`)."""
    result = LatencyRun()
    payload = [make_message(size_bytes, i, sender=sender, recipient=recipient) for i in range(min(messages, 64))]
    next_seq = 0
    deadline = time.monotonic() + overall_timeout

    async def worker() -> None:
        nonlocal next_seq
        while next_seq < messages and time.monotonic() < deadline:
            seq = next_seq
            next_seq += 1
            try:
                total, commit = await asyncio.wait_for(
                    one_message(host, port, payload[seq % len(payload)], sender=sender, recipient=recipient),
                    per_message_timeout,
                )
            except (TimeoutError, OSError, _Unexpected) as e:
                result.errors.append(f"{type(e).__name__}: {e}")
                continue
            result.total.append(total)
            result.commit.append(commit)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    result.elapsed = time.perf_counter() - started
    return result


def latency(host: str, port: int, **kwargs: object) -> LatencyRun:
    """Blocking wrapper of run_latency (for the scripts)."""
    return asyncio.run(run_latency(host, port, **kwargs))  # type: ignore[arg-type]
