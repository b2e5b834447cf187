"""The trust hand-off: `[policy] spf = true` on the real `backupmx serve`, SPF records on a local DNS
server, clients from 127.0.0.2 (permitted) and 127.0.0.3 (not): what the primary (aiosmtpd) receives
starts with `Authentication-Results: backup.test; spf=<result> smtp.mailfrom=<sender>` and then our
Received header, for pass, fail, softfail, none, temperror and the HELO identity of <>; an incoming field
claiming our authserv-id arrives renamed (RFC 8601 §5), every other byte as sent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.scenarios.test_edge_client import EdgeClient, wait_for
from tests.scenarios.test_edge_verify import AiosmtpdPrimary, Users
from tests.support.dnsserver import DnsServer
from tests.support.serve import ServeProcess, free_port

pytest.importorskip("spf")

ZONES = {
    "pass.test": {"@": {"TXT": '"v=spf1 ip4:127.0.0.2 -all"'}},
    "soft.test": {"@": {"TXT": '"v=spf1 ip4:127.0.0.2 ~all"'}},
    "nospf.test": {"@": {"A": "127.0.0.9"}},
    "broken.test": {"@": {"TXT": '"v=spf1 ip4:127.0.0.2 -all"'}},
}


class Everyone(Users):
    """A primary that takes every local part of ours.test."""

    def __init__(self) -> None:
        super().__init__("ours.test", set())

    async def handle_RCPT(
        self, server: object, session: object, envelope: object, address: str, rcpt_options: list[str]
    ) -> str:
        envelope.rcpt_tos.append(address)  # type: ignore[attr-defined]
        return "250 2.1.5 Ok"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, AiosmtpdPrimary, DnsServer]]:
    tmp_path = tmp_path_factory.mktemp("edge_spf")
    with DnsServer(ZONES) as dnsd:
        dnsd.fail("broken.test", rcode="SERVFAIL")
        primary = AiosmtpdPrimary(free_port(), Everyone())
        primary.start()
        node = ServeProcess(
            tmp_path / "node",
            domains=[{"name": "ours.test", "primary": [f"127.0.0.1:{primary.port}"], "recipients": "any"}],
            delivery={"probe_interval": "1s", "retry_min": "1s", "retry_max": "2s"},
            extra={"policy": {"spf": True}, "dns": {"nameservers": [dnsd.nameserver], "timeout": "1s"}},
        )
        try:
            with node:
                node.start()
                yield node, primary, dnsd
        finally:
            primary.stop()


def deliver(
    node: ServeProcess,
    primary: AiosmtpdPrimary,
    *,
    source: str,
    sender: str,
    helo: str = "client.test",
    body: bytes | None = None,
) -> bytes:
    """Send one message through the backup; return the bytes the primary received for it."""
    marker = f"X-Case: {source} {sender} {helo}".encode()
    body = body if body is not None else b"Subject: hello\r\n\r\nhi\r\n"
    body = marker + b"\r\n" + body
    with EdgeClient(node.port, source=source) as c:
        assert c.cmd(f"EHLO {helo}").startswith("250")
        replies = c.send_mail(body, sender=sender, rcpts=("alice@ours.test",))
        assert replies[-1].startswith("250 2.0.0 Ok: queued as"), replies

    def arrived() -> bytes | None:
        for _rcpts, content in primary.users.messages:
            if marker in content:
                return content
        return None

    assert wait_for(lambda: arrived() is not None, timeout=20), node.log()[-2000:]
    got = arrived()
    assert got is not None
    return got


@pytest.mark.parametrize(
    ("source", "sender", "helo", "header"),
    [
        (
            "127.0.0.2",
            "a@pass.test",
            "client.test",
            "Authentication-Results: backup.test; spf=pass smtp.mailfrom=a@pass.test",
        ),
        (
            "127.0.0.3",
            "a@pass.test",
            "client.test",
            "Authentication-Results: backup.test; spf=fail smtp.mailfrom=a@pass.test",
        ),
        (
            "127.0.0.3",
            "a@soft.test",
            "client.test",
            "Authentication-Results: backup.test; spf=softfail smtp.mailfrom=a@soft.test",
        ),
        (
            "127.0.0.2",
            "a@nospf.test",
            "client.test",
            "Authentication-Results: backup.test; spf=none smtp.mailfrom=a@nospf.test",
        ),
        (
            "127.0.0.2",
            "a@broken.test",
            "client.test",
            "Authentication-Results: backup.test; spf=temperror smtp.mailfrom=a@broken.test",
        ),
        ("127.0.0.2", "", "pass.test", "Authentication-Results: backup.test; spf=pass smtp.helo=pass.test"),
        ("127.0.0.3", "", "pass.test", "Authentication-Results: backup.test; spf=fail smtp.helo=pass.test"),
    ],
)
def test_authentication_results(
    world: tuple[ServeProcess, AiosmtpdPrimary, DnsServer], source: str, sender: str, helo: str, header: str
) -> None:
    node, primary, _ = world
    got = deliver(node, primary, source=source, sender=sender, helo=helo)
    lines = got.split(b"\r\n")
    assert lines[0].decode() == header
    assert lines[1].startswith(f"Received: from {helo} ([{source}] [{source}])".encode()), lines[:3]
    print(f"\n{source} MAIL FROM:<{sender}> HELO {helo}: {lines[0].decode()}")


def test_forged_results_are_renamed(world: tuple[ServeProcess, AiosmtpdPrimary, DnsServer]) -> None:
    node, primary, _ = world
    body = (
        b"Authentication-Results: backup.test; spf=pass smtp.mailfrom=ceo@pass.test\r\n"
        b"Authentication-Results: mx.sender.test; dkim=pass header.d=pass.test\r\n"
        b"Subject: trust me\r\n\r\n"
        b"Authentication-Results: backup.test; in the body, left alone\r\n"
    )
    got = deliver(node, primary, source="127.0.0.3", sender="ceo@pass.test", body=body)
    head, _, rest = got.partition(b"\r\nX-Case: ")
    assert head.split(b"\r\n")[0] == b"Authentication-Results: backup.test; spf=fail smtp.mailfrom=ceo@pass.test"
    expected = body.replace(
        b"Authentication-Results: backup.test; spf=pass", b"X-Forged-Authentication-Results: backup.test; spf=pass"
    )
    assert rest.split(b"\r\n", 1)[1] == expected
    assert got.count(b"\r\nAuthentication-Results: backup.test;") == 1  # only in the body
