"""The scripted primary itself: scripted 8-bit and split replies, recorded transactions with
un-stuffed bodies, the EHLO extension list, and the threaded mode a sync test uses."""

from __future__ import annotations

import asyncio
import smtplib

from tests.support.scripted_primary import Answer, ScriptedPrimary


async def _exchange(port: int, lines: list[bytes], replies: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = await reader.readline()
    for line in lines:
        writer.write(line)
    await writer.drain()
    got = b""
    while got.count(b"\r\n") < replies:
        chunk = await asyncio.wait_for(reader.read(4096), 5)
        if not chunk:
            break
        got += chunk
    writer.close()
    return out + got


async def test_scripted_8bit_split_reply_and_recorded_body() -> None:
    p = await ScriptedPrimary(extensions=("DSN", "SMTPUTF8")).start()
    try:
        p.script("DOT", Answer.of(b"250 2.0.0 Ok: f\xfcr M", b"\xfcller\r\n", delay=0.05))
        got = await _exchange(
            p.port,
            [
                b"EHLO c\r\n",
                b"MAIL FROM:<a@b>\r\n",
                b"RCPT TO:<x@y> NOTIFY=NEVER\r\n",
                b"DATA\r\n",
                b"Subject: s\r\n\r\n..dot\r\n.\r\n",
            ],
            7,
        )
        assert b"250-DSN\r\n250 SMTPUTF8\r\n" in got
        assert got.endswith(b"250 2.0.0 Ok: f\xfcr M\xfcller\r\n")
        assert [t.body for t in p.delivered()] == [b"Subject: s\r\n\r\n.dot\r\n"]
        assert p.copies("x@y") == 1 and p.delivered()[0].sender == "a@b"
    finally:
        await p.stop()


def test_threaded_mode_with_smtplib() -> None:
    p = ScriptedPrimary()
    p.script("RCPT", "550 5.1.1 no\r\n")
    with p.running():
        with smtplib.SMTP("127.0.0.1", p.port, timeout=5) as c:
            c.ehlo("c")
            assert c.has_extn("8bitmime")
            c.mail("a@b")
            assert c.rcpt("bad@y")[0] == 550
            assert c.rcpt("good@y")[0] == 250
            assert c.data(b"hello\r\n")[0] == 250
        p.wait_for(lambda q: len(q.delivered()) == 1, 5)
    assert p.delivered()[0].recipients == ["good@y"]
