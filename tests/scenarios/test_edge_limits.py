"""Anti-abuse against the real `backupmx serve`, from distinct loopback sources (127.0.0.2 the abuser,
127.0.0.3 a legitimate sender): 500 connections from one address against the per-IP connection limit
(421 4.7.0), a message burst against the token bucket (450 4.7.1), a DNSBL listing (554 5.7.1, the zone
only in the log), early talkers (554, logged) and the free-disk guard (452 4.3.1 at MAIL, logged) —
and through all of it mail from the other address still flows."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scenarios.test_edge_client import EdgeClient, maillog_events
from tests.support.dnsserver import DnsServer
from tests.support.serve import ServeProcess, free_port

ABUSER, GOOD = "127.0.0.2", "127.0.0.3"
BODY = b"Subject: hello\r\n\r\nlegitimate mail\r\n"
CONNECTIONS = 500


def domains() -> list[dict[str, object]]:
    return [{"name": "ours.test", "primary": [f"127.0.0.1:{free_port()}"], "recipients": "any"}]


def good_mail(node: ServeProcess) -> str:
    with EdgeClient(node.port, source=GOOD) as c:
        assert c.cmd("EHLO good.test").startswith("250")
        return c.send_mail(BODY)[-1]


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[ServeProcess]:
    node = ServeProcess(
        tmp_path / "node",
        domains=domains(),
        server={"max_connections_per_ip": 10, "max_connections": 600},
        extra={"policy": {"rate_limit": 6, "rate_burst": 5}},
    )
    with node:
        node.start()
        yield node


def test_connection_limit_under_a_burst_of_500(limited: ServeProcess) -> None:
    held: list[socket.socket] = []
    banners: dict[str, int] = {}
    try:
        for _ in range(CONNECTIONS):  # bounded: 500 connections from one address, each kept open
            s = socket.create_connection(("127.0.0.1", limited.port), timeout=10, source_address=(ABUSER, 0))
            held.append(s)
            line = s.recv(512).decode(errors="replace").strip()
            banners[line[:3]] = banners.get(line[:3], 0) + 1
            if line.startswith("421"):
                assert line == "421 4.7.0 Too many connections"
        assert banners == {"220": 10, "421": CONNECTIONS - 10}
        # meanwhile another address is served as usual
        assert good_mail(limited).startswith("250 2.0.0 Ok: queued as")
    finally:
        for s in held:
            s.close()
    refused = [ln for ln in maillog_events(limited.log(), "reject") if "stage=connect" in ln]
    assert len(refused) == CONNECTIONS - 10 and all(f"client={ABUSER}" in ln for ln in refused)
    assert limited.alive()


def test_message_rate_limit(limited: ServeProcess) -> None:
    with EdgeClient(limited.port, source=ABUSER) as c:
        c.cmd("EHLO abuser.test")
        answers = []
        for _ in range(20):  # a bounded burst of transactions in one session
            answers.append(c.cmd("MAIL FROM:<spam@abuser.test>"))
            c.cmd("RSET")
        assert answers[:5] == ["250 2.1.0 Ok"] * 5
        assert set(answers[5:]) == {f"450 4.7.1 Error: too much mail from {ABUSER}"}
    with EdgeClient(limited.port, source=ABUSER) as c:  # a new connection does not refill the bucket
        c.cmd("EHLO abuser.test")
        assert c.cmd("MAIL FROM:<spam@abuser.test>").startswith("450 4.7.1")
    assert good_mail(limited).startswith("250 2.0.0 Ok: queued as")
    rejects = [ln for ln in maillog_events(limited.log(), "reject") if "message rate limit" in ln]
    assert len(rejects) == 16


def test_dnsbl_listed_client(tmp_path: Path) -> None:
    zones = {"bl.test": {"2.0.0.127": {"A": "127.0.0.2"}}}
    with DnsServer(zones) as dnsd:
        node = ServeProcess(
            tmp_path / "node",
            domains=domains(),
            extra={"policy": {"dnsbl": ["bl.test"]}, "dns": {"nameservers": [dnsd.nameserver], "timeout": "2s"}},
        )
        with node:
            node.start()
            c = EdgeClient(node.port, source=ABUSER)
            assert c.banner == f"554 5.7.1 Service unavailable; Client host [{ABUSER}] blocked"
            assert c.closed()
            c.close()
            assert good_mail(node).startswith("250 2.0.0 Ok: queued as")
            rejects = maillog_events(node.log(), "reject")
            assert any(f"client={ABUSER}" in ln and "dnsbl bl.test" in ln for ln in rejects)
            # a DNS failure never rejects: the zone is skipped
            dnsd.fail("2.0.0.127.bl.test", rcode="SERVFAIL")
            with EdgeClient(node.port, source=ABUSER) as ok:
                assert ok.banner.startswith("220 ")


def test_early_talker_and_greeting_delay(tmp_path: Path) -> None:
    node = ServeProcess(tmp_path / "node", domains=domains(), server={"greeting_delay": "1s"})
    with node:
        node.start()
        c = EdgeClient(node.port, source=ABUSER, banner=False)
        c.send(b"EHLO impatient.test\r\n")
        assert c.reply() == "554 5.5.1 Protocol error: talked before greeting"
        assert c.closed()
        c.close()
        rejects = maillog_events(node.log(), "reject")
        assert any(f"client={ABUSER}" in ln and "pregreet" in ln for ln in rejects), rejects
        assert good_mail(node).startswith("250 2.0.0 Ok: queued as")  # a patient client waits for the 220


def test_free_disk_guard(tmp_path: Path) -> None:
    node = ServeProcess(tmp_path / "node", domains=domains(), server={"min_free_disk": "1000000GB"})
    with node:
        node.start()
        with EdgeClient(node.port, source=GOOD) as c:
            c.cmd("EHLO good.test")
            assert c.cmd("MAIL FROM:<s@sender.test>") == "452 4.3.1 Insufficient system storage"
        rejects = maillog_events(node.log(), "reject")
        assert any("stage=mail" in ln and "min_free_disk" in ln and "452 4.3.1" in ln for ln in rejects), rejects
        assert node.queue_count() == 0
