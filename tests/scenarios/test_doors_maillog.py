"""The mail log on a full disk against the real `backupmx serve` (issue 13 item 2): the log lives on a
64 KiB tmpfs filled to the last byte. Every client still gets its banner and its 250, sessions are
counted down to 0, /metrics counts the lost lines, stderr says so (once a minute), and when the disk
is freed the next lines land in the file again, with a word on stderr. Needs root for the mount.
Item 3: hostile HELO and addresses sent to a real serve come back from its mail log, through an
independent parser (tests/support/maillog_text.py), as exactly the values sent and no forged field."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scenarios.test_doors_smtp import node_at
from tests.scenarios.test_edge_client import EdgeClient, wait_for
from tests.support.maillog_text import parse
from tests.support.ports import wait_for_smtp
from tests.support.serve import ServeProcess

BODY = b"Subject: log disk full\r\n\r\nstill accepted\r\n"


@contextlib.contextmanager
def tiny_tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir(parents=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem says ENOSPC (bounded: the tmpfs is 64 KiB)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for _ in range(1024):
            try:
                f.write(b"x" * 4096)
            except OSError:
                break
    with pytest.raises(OSError), open(directory / "probe", "ab", buffering=0) as p:
        p.write(b"x" * 4096)
    return filler


def metrics(node: ServeProcess) -> str:
    token = (node.data_dir / "admin.token").read_text().strip()
    req = urllib.request.Request(
        f"http://127.0.0.1:{node.admin_port}/metrics", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return str(r.read().decode())


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else None


def send_one(node: ServeProcess) -> str:
    with EdgeClient(node.port) as c:  # the banner is read on connect: before the fix none came
        assert c.banner.startswith("220 backup.test")
        assert c.cmd("EHLO client.test").startswith("250")
        reply = c.send_mail(BODY, rcpts=("alice@ours.test",))[-1]
        assert c.cmd("QUIT") == "221 2.0.0 Bye"
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    return reply.rsplit(" ", 1)[1]


def test_full_log_disk_never_stops_mail_and_recovers(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "logdisk") as disk:
        maillog = disk / "mail.log"
        node = node_at(tmp_path / "node", admin=True, extra={"log": {"maillog": str(maillog)}})
        with node:
            filler = fill(disk)  # before the start: the log file's first page never fits
            node.start()
            ids = [send_one(node) for _ in range(3)]
            # three more sessions open at once, then gone: every one counted down
            idle = [EdgeClient(node.port) for _ in range(3)]
            assert all(c.banner.startswith("220") for c in idle)
            for c in idle:
                c.close()
            assert wait_for(lambda: metric(metrics(node), "backupmx_smtp_open_sessions") == 0.0)
            text = metrics(node)
            lost = metric(text, 'backupmx_log_write_errors_total{log="maillog"}')
            assert lost is not None and lost >= 3 * 4, text  # connect, queued, disconnect... per session
            assert maillog.stat().st_size == 0  # nothing fitted
            assert re.search(r"maillog \S+mail\.log: \d+ write\(s\) failed \(No space left on device\)", node.log())
            assert node.log().count("write(s) failed") == 1  # once a minute, not once a line
            # the disk is freed: the next lines are written again, and stderr says so
            filler.unlink()
            qid = send_one(node)
            assert wait_for(lambda: f"backupmx/queued: {qid}: " in maillog.read_text())
            assert "maillog" in node.log() and "writing again" in node.log()
            assert not any(f"backupmx/queued: {q}: " in maillog.read_text() for q in ids)
            assert node.queue_count() == 4
            assert node.alive()


# -- item 3: log line injection, read back by an independent parser ------------------------------------
HOSTILE_SENDER = '"x>, status=sent, relay=<fake"@evil.test'


def test_hostile_values_cannot_forge_a_mail_log_field(tmp_path: Path) -> None:
    maillog = tmp_path / "mail.log"
    node = node_at(tmp_path / "node", extra={"log": {"maillog": str(maillog)}})
    with node:
        node.start()
        with EdgeClient(node.port) as c:
            assert c.cmd(b"HELO evil\rFAKE\x1b[31m") == "501 5.5.2 Invalid hostname"
            assert c.cmd("EHLO client.test").startswith("250 ")
            assert c.cmd(f"MAIL FROM:<{HOSTILE_SENDER}>") == "250 2.1.0 Ok"
            assert c.cmd("RCPT TO:<u@evil.test>").startswith("554 5.7.1 ")
            assert c.cmd(f"RCPT TO:<{HOSTILE_SENDER.replace('evil.test', 'ours.test')}>") == "250 2.1.5 Ok"
            assert c.cmd("DATA").startswith("354 ")
            c.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
            qid = c.reply().rsplit(" ", 1)[1]
            assert c.cmd("QUIT") == "221 2.0.0 Bye"
        assert wait_for(lambda: "backupmx/disconnect:" in maillog.read_text())
    lines = maillog.read_text().split("\n")
    assert lines[-1] == "" and all(ln.isprintable() for ln in lines)  # no CR, no ESC, one event a line
    parsed = [parse(ln) for ln in lines[:-1]]
    by_event = {event: (q, fields) for _node, event, q, fields in parsed}
    assert next(f.get("command") for _n, e, _q, f in parsed if e == "reject") == "evil\rFAKE\x1b[31m"
    rcpt_reject = next(f for _n, e, _q, f in parsed if e == "reject" and f.get("stage") == "rcpt")
    assert rcpt_reject["sender"] == f"<{HOSTILE_SENDER}>" and "status" not in rcpt_reject
    q, queued = by_event["queued"]
    assert q == qid and queued["from"] == f"<{HOSTILE_SENDER}>"
    assert queued["to"] == f"<{HOSTILE_SENDER.replace('evil.test', 'ours.test')}>"
    assert "status" not in queued and "relay" not in queued


# -- item 2 with EPIPE: the mail log on stderr, and stderr a pipe nobody reads any more -----------------
def test_broken_stderr_pipe_never_stops_mail(tmp_path: Path) -> None:
    node = node_at(tmp_path / "node")  # no [log] maillog: the mail log goes to stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "backupmx.cli", "serve", "--config", str(node.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=node.env,
        cwd=str(node.workdir),
    )
    try:
        wait_for_smtp(node.host, node.port)
        assert proc.stderr is not None
        proc.stderr.close()  # every later write to stderr fails with EPIPE
        ids = [send_one(node) for _ in range(3)]  # banner, 250 and QUIT each time
        assert len(set(ids)) == 3 and proc.poll() is None
        assert node.queue_count() == 3
    finally:
        proc.kill()
        proc.wait(timeout=10)
