"""Scenario 02: the primary is down (nothing listening, then a black hole that accepts TCP and never
answers), mail arrives at the backup, the backup is SIGKILLed and restarted, then the primary (a
private Postfix from Debian delivering to Maildirs) comes back: every message arrives exactly once and
byte-identical, and the first delivery follows the primary's return within two probe intervals."""

from __future__ import annotations

import hashlib
import re
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.scenarios.test_01_serve_durability import make_body, send
from tests.support.postfix import PostfixInstance, postfix_unavailable_reason
from tests.support.serve import ServeProcess, free_port

PROBE_INTERVAL = 2.0

pytestmark = pytest.mark.postfix


def _norm(b: bytes) -> bytes:
    """Maildir files have LF line ends; compare content independent of CRLF vs LF."""
    return b.replace(b"\r\n", b"\n")


def _body_of(msg: bytes) -> bytes:
    return _norm(msg).split(b"\n\n", 1)[1]


def _first_delivery_time(log: str) -> float | None:
    for line in log.splitlines():
        if "backupmx/delivered:" in line:
            stamp = line.split(" ", 1)[0]
            return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    return None


def test_outage_kill_restart_recovery_with_postfix_primary(tmp_path: Path) -> None:
    reason = postfix_unavailable_reason()
    if reason:
        pytest.skip(reason)
    primary_port = free_port()
    node = ServeProcess(
        tmp_path / "node",
        domains=[{"name": "example.test", "primary": [f"127.0.0.1:{primary_port}"], "recipients": "any"}],
        delivery={
            "probe_interval": f"{int(PROBE_INTERVAL)}s",
            "probe_timeout": "1s",
            "down_after": 2,
            "retry_min": "1s",
            "retry_max": "3s",
            "connect_timeout": "2s",
            "command_timeout": "3s",
        },
    )
    with node:
        node.start()
        ledger: dict[str, tuple[str, bytes]] = {}  # message-id -> (recipient, body)
        for i in range(12):
            rcpt = "alice@example.test" if i % 2 == 0 else "bob@example.test"
            body = make_body(i, size=1500 + 331 * i)
            send(node.port, body, [rcpt])
            ledger[re.search(rb"Message-ID: <([^>]+)>", body).group(1).decode()] = (rcpt, body)  # type: ignore[union-attr]
        # Black hole: the port accepts TCP (kernel backlog) but nobody ever answers.
        hole = socket.socket()
        hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hole.bind(("127.0.0.1", primary_port))
        hole.listen(64)
        time.sleep(2 * PROBE_INTERVAL)
        node.kill()
        node.start()  # restarts with the queue, primary still a black hole
        for i in range(12, 16):
            body = make_body(i)
            send(node.port, body, ["alice@example.test"])
            ledger[re.search(rb"Message-ID: <([^>]+)>", body).group(1).decode()] = ("alice@example.test", body)  # type: ignore[union-attr]
        time.sleep(PROBE_INTERVAL)
        assert node.queue_count() == 16
        status = node.cli("queue", "list").stdout
        assert "alice@example.test" in status
        hole.close()
        with PostfixInstance("primary", port=primary_port, users=("alice", "bob")) as primary:
            primary.start()
            back_at = time.time()
            alice = primary.wait_for_messages("alice", 10, timeout=60)
            bob = primary.wait_for_messages("bob", 6, timeout=60)
            deadline = time.monotonic() + 30
            while node.queue_count() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert node.queue_count() == 0
            time.sleep(1.0)  # nothing more must arrive (no duplicates)
            alice, bob = primary.maildir_messages("alice"), primary.maildir_messages("bob")
        first = _first_delivery_time(node.log())
        assert first is not None
        assert first - back_at < 2 * PROBE_INTERVAL, f"first delivery {first - back_at:.2f}s after the primary's return"
        node.terminate()
    got: dict[str, tuple[str, bytes]] = {}
    for user, msgs in (("alice", alice), ("bob", bob)):
        for m in msgs:
            mid = re.search(rb"Message-ID: <([^>]+)>", m).group(1).decode()  # type: ignore[union-attr]
            assert mid not in got, f"duplicate delivery of {mid}"
            got[mid] = (user, m)
            assert re.search(rb"^Return-Path: <sender@sender.test>$", m, re.M), m[:300]
            assert re.search(rb"^Delivered-To: " + user.encode() + rb"@example.test$", m, re.M), m[:300]
            assert re.search(rb"^Received: from [^\n]+\n\tby backup.test \(backupmx", _norm(m), re.M), m[:600]
    assert set(got) == set(ledger)
    for mid, (rcpt, body) in ledger.items():
        user, m = got[mid]
        assert rcpt.startswith(user)
        assert hashlib.sha256(_body_of(m)).hexdigest() == hashlib.sha256(_body_of(body)).hexdigest()
