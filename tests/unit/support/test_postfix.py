"""The Postfix test peers work: a private primary delivers to Maildirs and refuses unknown users, a
private backup holds mail for a dead primary and drains it on flush, smtp-sink counts what smtp-source
sends, and nothing is left running afterwards."""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Callable

import pytest

from tests.support.ports import free_port, is_listening, wait_for_smtp
from tests.support.postfix import PostfixInstance, SmtpSink, _pids_in_group, smtp_source

pytestmark = pytest.mark.postfix

MESSAGE = (
    b"From: bob@sender.test\r\nTo: alice@example.test\r\nSubject: peer test\r\n"
    b"Message-ID: <peer-test@sender.test>\r\n\r\nhello from the support tests\r\n"
)


def test_free_port_is_free() -> None:
    port = free_port()
    assert not is_listening("127.0.0.1", port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_primary_delivers_to_maildir(postfix_primary: PostfixInstance) -> None:
    pf = postfix_primary
    with smtplib.SMTP(pf.host, pf.port, timeout=10) as c:
        c.ehlo("client.test")
        refused = c.sendmail("bob@sender.test", ["alice@example.test"], MESSAGE)
        assert refused == {}
    msgs = pf.wait_for_messages("alice", 1, timeout=15)
    assert len(msgs) == 1, pf.log()[-2000:]
    head = msgs[0].split(b"\n\n", 1)[0]
    assert b"Return-Path: <bob@sender.test>" in head
    assert b"Delivered-To: alice@example.test" in head
    assert b"hello from the support tests" in msgs[0]
    assert pf.maildir_messages("bob") == []


def test_primary_refuses_unknown_user_and_foreign_domain(postfix_primary: PostfixInstance) -> None:
    pf = postfix_primary
    with smtplib.SMTP(pf.host, pf.port, timeout=10) as c:
        c.ehlo("client.test")
        c.mail("bob@sender.test")
        code, msg = c.rcpt("nosuchuser@example.test")
        assert (code, msg[:5]) == (550, b"5.1.1"), msg
        code, msg = c.rcpt("someone@elsewhere.test")
        assert (code, msg[:5]) == (554, b"5.7.1"), msg


def test_backup_holds_then_drains_on_flush(postfix_backup: PostfixInstance) -> None:
    pf = postfix_backup
    res = smtp_source(pf.host, pf.port, messages=20, sessions=4, size_kb=2, recipient="anyone@example.test", timeout=60)
    assert res.ok, res.output
    counts = pf.wait_settled(20, timeout=30)
    assert counts["deferred"] == 20, counts
    assert pf.postqueue_count() == 20
    relay_host, relay_port = pf.relay
    with SmtpSink(relay_host, relay_port) as sink:  # the primary comes back where it was
        pf.flush()
        assert pf.wait_queue_count(0, timeout=30) == 0, pf.log()[-2000:]
        assert sink.wait_messages(20, timeout=10) == 20


def test_smtp_source_into_sink(smtp_sink: SmtpSink) -> None:
    res = smtp_source(smtp_sink.host, smtp_sink.port, messages=10, sessions=3, size_kb=5, timeout=30)
    assert res.ok, res.output
    assert res.elapsed > 0 and res.rate > 0
    assert smtp_sink.wait_messages(10, timeout=10) == 10


def test_smtp_source_reports_failure() -> None:
    res = smtp_source("127.0.0.1", free_port(), messages=1, timeout=30)
    assert not res.ok
    assert "refused" in res.output.lower()


def test_sink_dump_keeps_messages(sink_factory: Callable[..., SmtpSink]) -> None:
    sink = sink_factory(dump=True)
    assert sink.dump_dir is not None
    with smtplib.SMTP(sink.host, sink.port, timeout=10) as c:
        c.sendmail("bob@sender.test", ["alice@example.test"], MESSAGE)
    assert sink.wait_messages(1, timeout=10) == 1
    deadline = time.monotonic() + 5
    while not list(sink.dump_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    dumped = sink.dumped_messages()
    assert len(dumped) == 1 and b"hello from the support tests" in dumped[0]


def test_stop_leaves_nothing_running() -> None:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    pf = PostfixInstance("primary")
    pf.start()
    assert time.monotonic() - started < 3.0, "a private Postfix should start in well under 3 s"
    pgid = pf.master_pid
    assert pgid is not None and _pids_in_group(pgid)
    port, root = pf.port, pf.root
    pf.close()
    assert not _pids_in_group(pgid)
    assert not is_listening("127.0.0.1", port)
    assert not root.exists()
    pf.close()  # idempotent

    sink = SmtpSink().start()
    wait_for_smtp(sink.host, sink.port)
    sink.close()
    assert not sink.running and not is_listening(sink.host, sink.port)


def _unavailable() -> str | None:
    from tests.support.postfix import postfix_unavailable_reason

    return postfix_unavailable_reason()


def test_primary_goes_down_and_comes_back_on_its_port(postfix_primary: PostfixInstance) -> None:
    pf = postfix_primary
    port = pf.port
    pf.stop()
    assert not is_listening(pf.host, port)
    pf.start()
    assert pf.port == port
    with smtplib.SMTP(pf.host, pf.port, timeout=10) as c:
        assert c.sendmail("bob@sender.test", ["bob@example.test"], MESSAGE) == {}
    assert len(pf.wait_for_messages("bob", 1)) == 1
