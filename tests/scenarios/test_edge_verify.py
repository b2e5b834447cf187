"""recipients = "verify" against real primaries (aiosmtpd with a known user list, and a private Postfix):
known users accepted and unknown ones refused (550 5.1.1) while the primary is UP; the primary stopped
-> what was learned still holds (frozen), a never-seen address follows unknown_while_down; backupmx
restarted -> the knowledge is still there; `backupmx recipients` shows and edits it; the primary back ->
never-seen addresses are asked again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.scenarios.test_edge_client import EdgeClient, maillog_events, wait_for
from tests.support.postfix import PostfixInstance, postfix_unavailable_reason
from tests.support.serve import ServeProcess, free_port

DELIVERY = {
    "probe_interval": "1s",
    "probe_timeout": "2s",
    "down_after": 2,
    "recovery_guard": "1s",
    "retry_min": "1s",
    "retry_max": "2s",
    "connect_timeout": "2s",
    "command_timeout": "3s",
}


class Users:
    """An aiosmtpd handler: RCPT for a known local part -> 250, anything else -> 550 5.1.1."""

    def __init__(self, domain: str, users: set[str]) -> None:
        self.domain = domain
        self.users = users
        self.rcpts: list[str] = []
        self.messages: list[tuple[list[str], bytes]] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        self.rcpts.append(address)
        local, _, domain = address.rpartition("@")
        if domain.lower() == self.domain and local.lower() in self.users:
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 Ok"
        return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown in virtual mailbox table"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages.append((list(envelope.rcpt_tos), bytes(envelope.original_content or b"")))
        return "250 2.0.0 Ok: queued"


class AiosmtpdPrimary:
    def __init__(self, port: int, users: Users) -> None:
        self.port = port
        self.users = users
        self._controller: Controller | None = None

    def start(self) -> None:
        self._controller = Controller(
            self.users, hostname="127.0.0.1", port=self.port, decode_data=False, server_hostname="primary.test"
        )
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


def rcpt(node: ServeProcess, address: str, *, source: str = "127.0.0.1") -> str:
    with EdgeClient(node.port, source=source) as c:
        assert c.cmd("EHLO client.test").startswith("250")
        assert c.cmd("MAIL FROM:<s@sender.test>").startswith("250")
        reply = c.cmd(f"RCPT TO:<{address}>")
        c.cmd("QUIT")
        return reply


def learned(node: ServeProcess, domain: str) -> dict[str, tuple[bool, str]]:
    doc = json.loads(node.cli("recipients", "list", domain, "--json").stdout)
    return {e["address"]: (e["known"], e["source"]) for e in doc["domains"][domain]["learned"]}


def wait_event(node: ServeProcess, event: str, count: int = 1, timeout: float = 20.0) -> None:
    ok = wait_for(lambda: len(maillog_events(node.log(), event)) >= count, timeout=timeout)
    assert ok, f"no {event} event within {timeout}s:\n{node.log()[-3000:]}"


OK = "250 2.1.5 Ok"


def unknown(address: str) -> str:
    return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"


def unverified(address: str) -> str:
    return f"450 4.1.1 <{address}>: Recipient address rejected: unverified address"


@pytest.fixture
def primary() -> Iterator[AiosmtpdPrimary]:
    p = AiosmtpdPrimary(free_port(), Users("ours.test", {"alice", "bob"}))
    p.start()
    yield p
    p.stop()


def test_verify_with_aiosmtpd_primary(tmp_path: Path, primary: AiosmtpdPrimary) -> None:
    node = ServeProcess(
        tmp_path / "node",
        domains=[
            {
                "name": "ours.test",
                "primary": [f"127.0.0.1:{primary.port}"],
                "recipients": "verify",
                "unknown_while_down": "defer",
            }
        ],
        delivery=DELIVERY,
    )
    with node:
        node.start()
        # UP: the primary is asked once per address; its answers are remembered
        assert rcpt(node, "alice@ours.test") == OK
        assert rcpt(node, "nobody@ours.test") == unknown("nobody@ours.test")
        assert rcpt(node, "Alice@ours.test") == OK
        assert rcpt(node, "nobody@ours.test") == unknown("nobody@ours.test")
        assert [a.lower() for a in primary.users.rcpts] == ["alice@ours.test", "nobody@ours.test"]
        assert rcpt(node, "postmaster@ours.test") == OK  # never probed, always accepted
        verify_events = maillog_events(node.log(), "verify")
        assert len(verify_events) == 2 and "result=unknown" in verify_events[1]
        # DOWN: frozen knowledge; a never-seen address follows unknown_while_down = "defer"
        primary.stop()
        wait_event(node, "outage-declared")
        assert rcpt(node, "alice@ours.test") == OK
        assert rcpt(node, "nobody@ours.test") == unknown("nobody@ours.test")
        assert rcpt(node, "carol@ours.test") == unverified("carol@ours.test")
        with EdgeClient(node.port) as c:  # mail for a known user is taken and held
            c.cmd("EHLO client.test")
            replies = c.send_mail(b"Subject: held\r\n\r\nwhile the primary is down\r\n", rcpts=("alice@ours.test",))
            assert replies[-1].startswith("250 2.0.0 Ok: queued as")
        # restart: the knowledge is in the spool
        assert node.terminate() == 0
        node.start()
        assert rcpt(node, "alice@ours.test") == OK
        assert rcpt(node, "nobody@ours.test") == unknown("nobody@ours.test")
        assert rcpt(node, "carol@ours.test") == unverified("carol@ours.test")
        assert learned(node, "ours.test") == {"alice@ours.test": (True, "probe"), "nobody@ours.test": (False, "probe")}
        # the operator adds and removes while serve runs
        node.cli("recipients", "add", "carol@ours.test")
        assert rcpt(node, "carol@ours.test") == OK
        node.cli("recipients", "remove", "nobody@ours.test")
        assert rcpt(node, "nobody@ours.test") == unverified("nobody@ours.test")
        # back UP: the held message is delivered; never-seen addresses are asked again
        primary.start()
        wait_event(node, "primary-back")
        assert wait_for(lambda: any(b"while the primary is down" in m for _, m in primary.users.messages))
        assert wait_for(lambda: rcpt(node, "dave@ours.test") == unknown("dave@ours.test"), timeout=10)
        assert rcpt(node, "bob@ours.test") == OK
        assert node.queue_count() == 0


def test_verify_with_postfix_primary(tmp_path: Path) -> None:
    reason = postfix_unavailable_reason()
    if reason:
        pytest.skip(reason)
    port = free_port()
    with PostfixInstance("primary", domain="ours.test", port=port, users=("alice", "bob")) as pf:
        pf.start()
        node = ServeProcess(
            tmp_path / "node",
            domains=[
                {
                    "name": "ours.test",
                    "primary": [f"127.0.0.1:{port}"],
                    "recipients": "verify",
                    "unknown_while_down": "accept",
                }
            ],
            delivery=DELIVERY,
        )
        with node:
            node.start()
            assert rcpt(node, "alice@ours.test") == OK
            assert rcpt(node, "bob@ours.test") == OK
            assert rcpt(node, "mallory@ours.test") == unknown("mallory@ours.test")
            events = maillog_events(node.log(), "verify")
            assert any("User unknown in virtual mailbox table" in e for e in events), events
            pf.stop()
            wait_event(node, "outage-declared")
            assert rcpt(node, "alice@ours.test") == OK
            assert rcpt(node, "mallory@ours.test") == unknown("mallory@ours.test")
            assert rcpt(node, "zoe@ours.test") == OK  # never seen, unknown_while_down = "accept"
            with EdgeClient(node.port) as c:  # accepted while down: the primary will decide
                c.cmd("EHLO client.test")
                assert c.send_mail(b"Subject: hi zoe\r\n\r\nwelcome\r\n", rcpts=("zoe@ours.test",))[-1].startswith(
                    "250 2.0.0 Ok: queued as"
                )
            node.kill()  # even a SIGKILL keeps what was learned (committed when learned)
            node.start()
            assert rcpt(node, "bob@ours.test") == OK
            assert rcpt(node, "mallory@ours.test") == unknown("mallory@ours.test")
            assert set(learned(node, "ours.test")) == {"alice@ours.test", "bob@ours.test", "mallory@ours.test"}
            # zoe's mailbox is created meanwhile; the primary comes back and takes the held message:
            # the delivery teaches the backup that zoe exists
            pf.add_users("zoe")
            pf.start()
            wait_event(node, "delivered")
            assert pf.wait_for_messages("zoe", 1)
            assert wait_for(lambda: learned(node, "ours.test").get("zoe@ours.test") == (True, "delivered"))


def test_accept_only_when_primary_down(tmp_path: Path, primary: AiosmtpdPrimary) -> None:
    gate = "450 4.3.2 Temporarily not accepting mail for this domain, try again later"
    node = ServeProcess(
        tmp_path / "node",
        domains=[
            {
                "name": "ours.test",
                "primary": [f"127.0.0.1:{primary.port}"],
                "recipients": "any",
                "accept": "when_primary_down",
            }
        ],
        delivery=DELIVERY,
    )
    with node:
        node.start()
        assert wait_for(lambda: rcpt(node, "alice@ours.test") == gate, timeout=10)  # UP: go to the primary
        rejects = maillog_events(node.log(), "reject")
        assert any("when_primary_down" in ln for ln in rejects)
        primary.stop()
        wait_event(node, "outage-declared")
        assert rcpt(node, "alice@ours.test") == OK  # DOWN: the backup takes the mail
        primary.start()
        wait_event(node, "primary-back")
        assert wait_for(lambda: rcpt(node, "alice@ours.test") == gate, timeout=10)  # UP again
