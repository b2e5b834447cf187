"""Content filtering with a real rspamd (Debian's, started on loopback by tests/support/rspamd.py) in front
of the real `backupmx serve`: GTUBE is refused with 550 5.7.1 and nothing is stored; a clean message is
stored with rspamd's milter headers (and a forged X-Spamd-Result removed); add header → X-Spam: Yes;
rewrite subject → the new Subject; soft reject → 451 4.7.1; a domain with filter = false is not scanned;
a stopped rspamd follows on_error (accept: stored as it came; tempfail: 451 4.3.0)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scenarios.test_edge_client import EdgeClient
from tests.support.ports import free_port, wait_for_smtp
from tests.support.rspamd import GTUBE, GTUBE_ADD_HEADER, GTUBE_REWRITE_SUBJECT, SOFT_REJECT_SENDER, Rspamd
from tests.support.serve import ServeProcess

pytestmark = pytest.mark.skipif(not Rspamd.available(), reason="needs Debian's rspamd (/usr/bin/rspamd)")


def node_for(workdir: Path, rspamd_url: str, **filter_keys: str) -> ServeProcess:
    dead = free_port()  # no primary: what is accepted stays in the queue, where the test reads it
    return ServeProcess(
        workdir,
        domains=[
            {"name": "ours.test", "primary": [f"127.0.0.1:{dead}"], "recipients": ["alice", "bob"]},
            {"name": "unfiltered.test", "primary": [f"127.0.0.1:{dead}"], "recipients": ["carol"], "filter": False},
        ],
        extra={
            "filter": {"rspamd": rspamd_url, "timeout": "5s", **filter_keys},
            "dns": {"nameservers": [f"127.0.0.1:{free_port()}"], "timeout": "1s"},
        },
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, Rspamd]]:
    tmp = tmp_path_factory.mktemp("edge_rspamd")
    with Rspamd(tmp / "rspamd") as rspamd, node_for(tmp / "node", rspamd.url) as node:
        node.start()
        yield node, rspamd


def message(text: bytes, subject: bytes = b"lunch") -> bytes:
    return (
        b"From: Sam <s@sender.test>\r\nTo: alice@ours.test\r\nSubject: "
        + subject
        + b"\r\nMessage-ID: <m1@sender.test>\r\nDate: Sun, 06 Dec 2026 03:00:00 +0000\r\n\r\n"
        + text
        + b"\r\n"
    )


def send(node: ServeProcess, body: bytes, *, sender: str = "s@sender.test", rcpt: str = "alice@ours.test") -> str:
    with EdgeClient(node.port, source="127.0.0.2") as c:
        assert c.cmd("EHLO client.test").startswith("250")
        replies = c.send_mail(body, sender=sender, rcpts=(rcpt,))
    assert replies[:2] == ["250 2.1.0 Ok", "250 2.1.5 Ok"], replies
    return replies[-1]


def stored(node: ServeProcess, reply: str) -> bytes:
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    qid = reply.rsplit(" ", 1)[1]
    res = subprocess.run(
        [sys.executable, "-m", "backupmx.cli", "queue", "show", qid, "--body", "--config", str(node.config_path)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return res.stdout  # bytes: the stored message exactly


def header_of(body: bytes) -> list[str]:
    return body.partition(b"\r\n\r\n")[0].decode().replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n")


def test_gtube_is_refused_and_nothing_stored(world: tuple[ServeProcess, Rspamd]) -> None:
    node, _ = world
    before = node.queue_count()
    assert send(node, message(GTUBE)) == "550 5.7.1 Message rejected as spam"
    assert node.queue_count() == before
    assert "rspamd reject score=" in node.log() and "Gtube pattern" in node.log()


def test_clean_message_is_stored_with_rspamds_headers(world: tuple[ServeProcess, Rspamd]) -> None:
    node, _ = world
    forged = b"X-Spamd-Result: default: False [-100.00 / 15.00]\r\n"
    reply = send(node, forged + message(b"See you at noon?"))
    qid = reply.rsplit(" ", 1)[1]
    fields = header_of(stored(node, reply))
    assert f"X-Rspamd-Queue-Id: {qid}" in fields
    assert "X-Rspamd-Action: no action" in fields
    results = [f for f in fields if f.startswith("X-Spamd-Result:")]
    assert len(results) == 1 and "-100.00" not in results[0]  # the forged one removed, rspamd's added
    assert fields[0].startswith("Received: from client.test ([127.0.0.2]")  # our header still on top


def test_add_header_and_rewrite_subject(world: tuple[ServeProcess, Rspamd]) -> None:
    node, _ = world
    fields = header_of(stored(node, send(node, message(GTUBE_ADD_HEADER))))
    assert "X-Spam: Yes" in fields
    fields = header_of(stored(node, send(node, message(GTUBE_REWRITE_SUBJECT, subject=b"hi"))))
    assert [f for f in fields if f.lower().startswith("subject:")] == ["Subject: *** SPAM *** hi"]


def test_soft_reject_is_451(world: tuple[ServeProcess, Rspamd]) -> None:
    node, _ = world
    before = node.queue_count()
    assert send(node, message(b"hello"), sender=SOFT_REJECT_SENDER) == "451 4.7.1 Try again later"
    assert node.queue_count() == before


def test_domain_with_filter_off_is_not_scanned(world: tuple[ServeProcess, Rspamd]) -> None:
    node, _ = world
    body = stored(node, send(node, message(GTUBE), rcpt="carol@unfiltered.test"))
    assert b"X-Rspamd" not in body and GTUBE in body


def test_stopped_rspamd_follows_on_error(tmp_path: Path) -> None:
    with (
        Rspamd(tmp_path / "rspamd") as rspamd,
        node_for(tmp_path / "accept", rspamd.url) as accepting,
        node_for(tmp_path / "tempfail", rspamd.url, on_error="tempfail") as deferring,
    ):
        accepting.start(wait=False)
        deferring.start()
        wait_for_smtp(accepting.host, accepting.port)
        rspamd.stop()
        assert send(deferring, message(GTUBE)) == "451 4.3.0 Error: temporary failure, try again later"
        body = stored(accepting, send(accepting, message(GTUBE)))  # on_error = "accept", the default
        assert GTUBE in body and b"X-Rspamd" not in body  # stored as it came
        assert "rspamd unavailable" in accepting.log() and "rspamd unavailable" in deferring.log()
