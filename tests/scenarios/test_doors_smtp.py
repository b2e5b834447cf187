"""The SMTP door against the real `backupmx serve` (issue 13): a TLS 1.3 client whose Finished and EHLO
arrive in one segment, a start whose admin port is taken (nothing served, nothing accepted), commands
pipelined before our reply (`forbid_early_pipelining`), and slow-loris clients that neither outlive
`session_timeout` nor keep a legitimate sender out."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from tests.scenarios.test_edge_client import EdgeClient, maillog_events, make_cert, wait_for
from tests.support.serve import ServeProcess, free_port

DOMAINS = [{"name": "ours.test", "primary": ["127.0.0.1:1"], "recipients": "any"}]


def node_at(
    path: Path,
    *,
    server: dict[str, Any] | None = None,
    admin: bool = False,
    env: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> ServeProcess:
    # no lookup may leave the machine: a loopback nameserver where nothing listens
    return ServeProcess(
        path,
        domains=[{**d, "primary": [f"127.0.0.1:{free_port()}"]} for d in DOMAINS],
        server=server,
        admin=admin,
        env=env,
        extra={"dns": {"nameservers": [f"127.0.0.1:{free_port()}"]}, **(extra or {})},
    )


def without_uvloop(directory: Path) -> dict[str, str]:
    """The environment of a host without the optional uvloop: `serve` then runs the stock asyncio loop
    (which hands decrypted bytes over before start_tls() returns; uvloop does it after)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "uvloop.py").write_text('raise ImportError("uvloop is not installed on this host")\n')
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH", "")) if p)}


# -- 1. STARTTLS: what arrives with the client's Finished is kept ---------------------------------------
class MemoryTls:
    """A TLS client over a blocking socket through memory BIOs, so that the test decides what goes out in
    which segment (ssl.SSLSocket would send the Finished on its own)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        self.sock = sock
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="backup.test")
        self._buf = b""

    def handshake_unsent(self) -> None:
        """Run the handshake up to the client's Finished, which stays unsent in the outgoing BIO."""
        while True:
            try:
                self.obj.do_handshake()
                return
            except ssl.SSLWantReadError:
                self.send(b"")
                self._receive()

    def send(self, data: bytes) -> None:
        """`data` (may be empty) and whatever TLS records are pending, in one sendall."""
        if data:
            self.obj.write(data)
        pending = self.out.read()
        if pending:
            self.sock.sendall(pending)

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed by the server after {self._buf!r}")
        self.inc.write(data)

    def reply(self) -> str:
        """One whole SMTP reply, as its last line; bounded by the socket's timeout."""
        while True:
            while b"\r\n" in self._buf:
                line, _, self._buf = self._buf.partition(b"\r\n")
                if len(line) < 4 or line[3:4] != b"-":
                    return line.decode()
            try:
                self._buf += self.obj.read(65536)
            except ssl.SSLWantReadError:
                self._receive()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_starttls_finished_and_ehlo_in_one_segment(tmp_path: Path, loop: str) -> None:
    cert, key = make_cert(tmp_path / "tls")
    env = without_uvloop(tmp_path / "shim") if loop == "asyncio" else None
    with node_at(tmp_path / "node", server={"tls_cert": str(cert), "tls_key": str(key)}, env=env) as node:
        node.start()
        c = EdgeClient(node.port)
        c.send(b"EHLO client.test\r\n")
        assert any("STARTTLS" in ln for ln in c.reply_lines())
        assert c.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        c.sock.settimeout(5.0)  # bounded: before the fix the EHLO was dropped and no reply ever came
        tls = MemoryTls(c.sock, ctx)
        tls.handshake_unsent()
        assert tls.obj.version() == "TLSv1.3"
        tls.send(b"EHLO client.test\r\n")  # joins the client's Finished: one segment
        assert tls.reply() == "250 DSN"
        tls.send(b"MAIL FROM:<s@sender.test>\r\nRCPT TO:<alice@ours.test>\r\nDATA\r\n")
        assert [tls.reply() for _ in range(3)] == [
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
        ]
        tls.send(b"Subject: tls\r\n\r\nover TLS 1.3\r\n.\r\nQUIT\r\n")
        assert tls.reply().startswith("250 2.0.0 Ok: queued as ")
        assert tls.reply() == "221 2.0.0 Bye"
        c.close()
        assert node.queue_count() == 1


# -- 8. start-up order: bind everything, then serve ------------------------------------------------------
def test_admin_port_taken_exits_nonzero_and_no_client_was_greeted(tmp_path: Path) -> None:
    node = node_at(tmp_path / "node", admin=True)
    assert node.admin_port is not None
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", node.admin_port))
    squatter.listen(1)
    heard: list[bytes] = []
    try:
        with node:
            node.start(wait=False)
            proc = node.proc
            assert proc is not None
            deadline = time.monotonic() + 30  # bounded: one client after another until the process ends
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", node.port), timeout=2) as s:
                        s.settimeout(2)
                        with contextlib.suppress(OSError):
                            heard.append(s.recv(512))
                except OSError:
                    time.sleep(0.005)
            rc = proc.wait(timeout=10)
    finally:
        squatter.close()
    assert rc == 1, node.log()
    assert [h for h in heard if h] == []  # not a 220, not a 421: nobody was accepted
    log = node.log()
    assert f"cannot start: [Errno 98] admin listener 127.0.0.1:{node.admin_port}: " in log, log
    assert "address already in use" in log.lower()
    assert "smtp listening" not in log and "backupmx/connect" not in log


# -- pipelining before it is offered (forbid_early_pipelining, on by default) ----------------------------
SYNC = "554 5.5.0 Error: SMTP protocol synchronization"
MAIL1 = b"From: alice@sender.test\r\nSubject: Hello World\r\n\r\nThis is mail 1/2 to test pipelining\r\n.\r\n"
MAIL2 = (
    b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@ours.test>\r\nDATA\r\n"
    b"From: alice@sender.test\r\nSubject: Hello World 2\r\n\r\nThis is mail 2/2 to test pipelining\r\n.\r\n"
)


def mail_1_then_2_before_354(c: EdgeClient) -> None:
    """smtpsmug's "pipelining" test: a proper transaction up to 354, then mail 1's content, its end, and mail 2's
    commands and content in the same write (before any reply to mail 1's end)."""
    assert c.cmd("EHLO sender.test").startswith("250 ")
    assert c.cmd("MAIL FROM:<alice@sender.test>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<bob@ours.test>") == "250 2.1.5 Ok"
    assert c.cmd("DATA").startswith("354 ")
    c.send(MAIL1 + MAIL2)


def test_early_pipelining_gets_554_and_the_end(tmp_path: Path) -> None:
    with node_at(tmp_path / "node") as node:
        node.start()
        # a bot: EHLO and the whole transaction in one write, before our EHLO reply
        with EdgeClient(node.port) as c:
            c.send(b"EHLO bot.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<bob@ours.test>\r\nDATA\r\n")
            assert c.reply() == SYNC
            assert c.closed()
        # smtpsmug's "pipelining" test: mail 1 ends, then mail 2's commands AND content before our 354
        with EdgeClient(node.port) as c:
            mail_1_then_2_before_354(c)
            first = c.reply()
            assert first.startswith("250 2.0.0 Ok: queued as ")  # mail 1 is a proper message
            assert [c.reply() for _ in range(3)] == ["250 2.1.0 Ok", "250 2.1.5 Ok", SYNC]
            assert c.closed()
        assert node.queue_count() == 1  # mail 2 was never taken
        shown = node.cli("queue", "show", first.rsplit(" ", 1)[1], "--body").stdout
        assert "mail 1/2" in shown and "mail 2/2" not in shown
        rejects = [ln for ln in maillog_events(node.log(), "reject") if "5.5.0" in ln]
        assert len(rejects) == 2 and all("pipelined before our reply" in ln for ln in rejects)


def test_early_pipelining_allowed_when_switched_off(tmp_path: Path) -> None:
    with node_at(tmp_path / "node", server={"forbid_early_pipelining": False}) as node:
        node.start()
        with EdgeClient(node.port) as c:
            mail_1_then_2_before_354(c)
            replies = [c.reply() for _ in range(5)]
            assert replies[0].startswith("250 2.0.0 Ok: queued as ") and replies[4].startswith("250 2.0.0 Ok: queued")
        assert node.queue_count() == 2


# -- slow-loris: one byte a second in DATA ---------------------------------------------------------------
ABUSERS = ("127.0.0.2", "127.0.0.4", "127.0.0.5")
GOOD = "127.0.0.3"


def test_slow_loris_ends_at_session_timeout_and_never_locks_out_a_sender(tmp_path: Path) -> None:
    # small on purpose: 10 slots (1 kept for new addresses), a loose per-address limit, 3 s per session
    node = node_at(
        tmp_path / "node",
        server={"max_connections": 10, "max_connections_per_ip": 50, "session_timeout": "3s", "idle_timeout": "2s"},
    )
    with node:
        node.start()
        loris: list[EdgeClient] = []
        refused = 0
        try:
            for i in range(30):  # bounded: 30 attempts from 3 addresses
                c = EdgeClient(node.port, source=ABUSERS[i % 3])
                if c.banner.startswith("421"):
                    assert c.banner == "421 4.7.0 Too many connections"
                    refused += 1
                    c.close()
                    continue
                loris.append(c)
                assert c.cmd("EHLO loris.test").startswith("250 ")
                assert c.cmd("MAIL FROM:<s@loris.test>") == "250 2.1.0 Ok"
                assert c.cmd("RCPT TO:<alice@ours.test>") == "250 2.1.5 Ok"
                assert c.cmd("DATA").startswith("354 ")
                c.send(b"S")
            assert (len(loris), refused) == (9, 21)
            # a legitimate sender from a fresh address gets the kept slot, and its mail goes in
            with EdgeClient(node.port, source=GOOD) as good:
                assert good.banner.startswith("220 ")
                assert good.cmd("EHLO good.test").startswith("250 ")
                assert good.send_mail(b"Subject: hi\r\n\r\nlegitimate\r\n")[-1].startswith("250 2.0.0 Ok: queued as")
            # one byte a second (never idle for idle_timeout) until the session cap answers 421 4.4.2
            answers: dict[int, str] = {}
            for _ in range(12):  # bounded: 12 s at most, the cap is 3 s
                for n, c in enumerate(loris):
                    if n in answers:
                        continue
                    with contextlib.suppress(OSError):
                        c.send(b"x")
                    c.sock.settimeout(0.0)
                    try:
                        answers[n] = c.reply()
                    except (BlockingIOError, ssl.SSLWantReadError):
                        pass
                    except (ConnectionError, OSError) as e:
                        answers[n] = f"closed: {e}"
                    finally:
                        c.sock.settimeout(10.0)
                if len(answers) == len(loris):
                    break
                time.sleep(1.0)
            assert set(answers.values()) == {"421 4.4.2 backup.test Error: session too long"}, answers
        finally:
            for c in loris:
                c.close()

        def abuser_admitted_again() -> bool:  # their sessions were counted down
            with EdgeClient(node.port, source=ABUSERS[0]) as c:
                return c.banner.startswith("220 ")

        assert wait_for(abuser_admitted_again)
        assert node.queue_count() == 1  # only the legitimate message
