"""Scenario 01: what `250` promises. The real `backupmx serve` is SIGKILLed right after a batch of
250 replies, and at each point of its write path; after a restart every acknowledged message is in the
queue byte for byte, and nothing is ever half-stored."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import smtplib
import socket
import subprocess
from pathlib import Path

import pytest

from backupmx.model import QueueId
from backupmx.spool.sqlite import SqliteSpool
from tests.support.serve import ServeProcess

QUEUED_RE = re.compile(r"queued as ([0-9A-Z]+)")


def make_body(i: int, size: int = 3000) -> bytes:
    head = (
        f"From: sender{i}@sender.test\r\nTo: alice@example.test\r\nSubject: message {i}\r\n"
        f"Message-ID: <{i}.{os.urandom(4).hex()}@sender.test>\r\n\r\n"
    ).encode()
    line = (f"line of message {i} " * 4).encode()[:70] + b"\r\n"
    body = head + line * max(1, size // len(line))
    return body + b".starts with a dot\r\n"  # dot transparency on the way in


def send(port: int, body: bytes, rcpts: list[str] | None = None) -> str:
    """One message over one session; returns the queue ID from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        c.mail("sender@sender.test")
        for r in rcpts or ["alice@example.test"]:
            code, msg = c.rcpt(r)
            assert code == 250, msg
        code, msg = c.data(body)
        assert code == 250, msg
        m = QUEUED_RE.search(msg.decode())
        assert m, msg
        return m.group(1)


async def stored(data_dir: Path) -> dict[str, bytes]:
    spool = SqliteSpool(data_dir)
    await spool.open()
    try:
        out: dict[str, bytes] = {}
        after: QueueId | None = None
        while True:
            page = await spool.list_messages(limit=500, after=after)
            for m in page:
                out[m.id] = await spool.read_body(m.id)
                assert m.recipients, f"{m.id} has no recipients: half-stored"
            if len(page) < 500:
                return out
            after = page[-1].id
    finally:
        await spool.close()


def assert_intact(ledger: dict[str, bytes], got: dict[str, bytes]) -> None:
    missing = set(ledger) - set(got)
    assert not missing, f"acknowledged but missing after SIGKILL: {sorted(missing)[:5]}"
    for qid, body in ledger.items():
        s = got[qid]
        assert s.startswith(b"Received: "), s[:80]
        assert s.endswith(body), f"{qid}: body differs"
        assert s.count(b"Received: ") == 1
        assert qid.encode() in s.split(b"\r\n\r\n", 1)[0]  # the Received header names the queue ID


def test_sigkill_after_batch_of_250s_loses_nothing(tmp_path: Path) -> None:
    node = ServeProcess(tmp_path / "node")
    with node:
        node.start()
        ledger: dict[str, bytes] = {}
        for i in range(40):
            body = make_body(i, size=2000 + 97 * i)
            ledger[send(node.port, body)] = body
        big = make_body(999, size=3_000_000)  # larger than the in-memory threshold: goes via a temp file
        ledger[send(node.port, big)] = big
        node.kill()  # right after the last 250: no graceful anything
        got = asyncio.run(stored(node.data_dir))
        assert_intact(ledger, got)
        node.start()  # restarts on the same spool and still serves
        assert node.queue_count() == len(ledger)
        body = make_body(1000)
        ledger[send(node.port, body)] = body
        node.kill()
    assert_intact(ledger, asyncio.run(stored(node.data_dir)))


@pytest.mark.postfix
def test_sigkill_after_smtp_source_batch(tmp_path: Path) -> None:
    smtp_source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not os.path.exists(smtp_source):
        pytest.skip("Debian's postfix (smtp-source) is not installed")
    node = ServeProcess(tmp_path / "node")
    with node:
        node.start()
        n = 300
        res = subprocess.run(
            [
                smtp_source,
                "-s",
                "10",
                "-m",
                str(n),
                "-l",
                "5000",
                "-f",
                "sender@sender.test",
                "-t",
                "alice@example.test",
                f"127.0.0.1:{node.port}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr  # smtp-source exits non-zero on any reply but 250
        node.kill()
        got = asyncio.run(stored(node.data_dir))
        assert len(got) == n
        for body in got.values():
            assert len(body) > 5000


def _send_expect_drop(port: int, body: bytes) -> str | None:
    """Sends one message; returns the queue ID if a 250 came, None if the connection dropped."""
    try:
        return send(port, body)
    except (TimeoutError, smtplib.SMTPServerDisconnected, ConnectionResetError, OSError):
        return None


@pytest.mark.parametrize("point", ["spool.before_commit", "spool.after_commit"])
def test_fault_injection_on_write_path(tmp_path: Path, point: str) -> None:
    """The process dies at a point of the write path on the 3rd commit: the two acknowledged messages
    before it survive; the one in flight got no 250 and is either wholly there (after_commit) or absent
    (before_commit), never half-stored."""
    node = ServeProcess(tmp_path / "node", env={"BACKUPMX_FAULT": point, "BACKUPMX_FAULT_AFTER": "3"})
    with node:
        node.start()
        ledger: dict[str, bytes] = {}
        for i in range(2):
            body = make_body(i)
            ledger[send(node.port, body)] = body
        victim = make_body(2)
        assert _send_expect_drop(node.port, victim) is None, "a 250 escaped a process that died before replying"
        assert node.proc is not None
        node.proc.wait(timeout=10)
        got = asyncio.run(stored(node.data_dir))
        assert_intact(ledger, got)
        extra = {q: b for q, b in got.items() if q not in ledger}
        if point == "spool.before_commit":
            assert extra == {}
        else:
            assert len(extra) == 1 and next(iter(extra.values())).endswith(victim)
        node.start(env={"BACKUPMX_FAULT": ""})  # the client retries after a restart: accepted again
        body = make_body(3)
        ledger[send(node.port, body)] = body
        node.kill()
    assert_intact(ledger, asyncio.run(stored(node.data_dir)))


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_answers_452_and_stays_up(tmp_path: Path, tiny_tmpfs: Path) -> None:
    node = ServeProcess(tmp_path / "node", server={"data_dir": str(tiny_tmpfs / "data"), "min_free_disk": "0"})
    node.data_dir = tiny_tmpfs / "data"
    with node:
        node.start()
        ledger: dict[str, bytes] = {}
        replies: list[int] = []
        for i in range(30):  # 30 x 300 KB cannot fit in 3 MB: the disk fills up
            body = make_body(i, size=300_000)
            with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as c:
                c.ehlo("client.test")
                c.mail("sender@sender.test")
                c.rcpt("alice@example.test")
                code, msg = c.data(body)
                replies.append(code)
                if code == 250:
                    m = QUEUED_RE.search(msg.decode())
                    assert m
                    ledger[m.group(1)] = body
                else:
                    assert (code, msg[:5]) == (452, b"4.3.1"), msg
        assert 452 in replies and 250 in replies, replies
        assert node.alive()
        with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as c:  # still serving
            assert c.noop()[0] == 250
        node.kill()
        assert_intact(ledger, asyncio.run(stored(node.data_dir)))


def test_sigterm_stops_gracefully_and_keeps_mail(tmp_path: Path) -> None:
    node = ServeProcess(tmp_path / "node")
    with node:
        node.start()
        ledger: dict[str, bytes] = {}
        for i in range(5):
            body = make_body(i)
            ledger[send(node.port, body)] = body
        idle = socket.create_connection(("127.0.0.1", node.port), timeout=30)
        assert idle.recv(512).startswith(b"220")
        idle.sendall(b"EHLO idle.test\r\n")
        assert b"250 " in _read_until(idle, b"250 ")
        assert node.terminate() == 0  # exits 0 on SIGTERM
        rest = _read_until(idle, b"\n", eof_ok=True)
        assert rest.startswith(b"421"), rest  # the idle session was told, not dropped
        idle.close()
    assert_intact(ledger, asyncio.run(stored(node.data_dir)))


def _read_until(sock: socket.socket, marker: bytes, eof_ok: bool = False) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            assert eof_ok, data
            break
        data += chunk
    return data
