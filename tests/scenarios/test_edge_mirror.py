"""The primary's EHLO mirrored at our door, on a real `backupmx serve`: primaries (aiosmtpd) that do not offer
SMTPUTF8 or take only small messages make us refuse such mail while the sender is on the line: at MAIL when
no served domain's primary takes it, at RCPT for the domains whose primary does not; the last answer
seen while the primary was up survives its outage and a restart of serve."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from backupmx.policy.mirror import Offer
from tests.scenarios.test_edge_client import EdgeClient, wait_for
from tests.support.ports import free_port
from tests.support.serve import ServeProcess


class Everyone:
    async def handle_RCPT(
        self, server: object, session: object, envelope: object, address: str, rcpt_options: list[str]
    ) -> str:
        envelope.rcpt_tos.append(address)  # type: ignore[attr-defined]
        return "250 2.1.5 Ok"


def primary(*, smtputf8: bool, size: int) -> Controller:
    c = Controller(
        Everyone(),
        hostname="127.0.0.1",
        port=free_port(),
        decode_data=False,
        server_hostname="primary.test",
        enable_SMTPUTF8=smtputf8,
        data_size_limit=size,
    )
    c.start()
    return c


UTF8_SENDER = "j\u00f6rg@sender.test"


def mail_rcpt(
    node: ServeProcess, mail_params: str, rcpt: str, *, sender: str = "s@sender.test"
) -> tuple[str, str | None]:
    with EdgeClient(node.port) as c:
        assert c.cmd("EHLO client.test").startswith("250")
        mail = c.cmd(f"MAIL FROM:<{sender}>{mail_params}")
        if not mail.startswith("250"):
            return mail, None
        return mail, c.cmd(f"RCPT TO:<{rcpt}>")


@pytest.fixture
def primaries() -> Iterator[tuple[Controller, Controller]]:
    small = primary(smtputf8=False, size=1000)  # no SMTPUTF8, SIZE 1000
    big = primary(smtputf8=True, size=10_000_000)
    try:
        yield small, big
    finally:
        for c in (small, big):
            with contextlib.suppress(AssertionError):  # the test may have stopped it already
                c.stop()


def test_mirrored_at_rcpt_and_at_mail(tmp_path: Path, primaries: tuple[Controller, Controller]) -> None:
    small, big = primaries
    dns = {"dns": {"nameservers": [f"127.0.0.1:{free_port()}"], "timeout": "1s"}}
    one = {"name": "one.test", "primary": [f"127.0.0.1:{small.port}"], "recipients": "any", "accept": "always"}
    two = {"name": "two.test", "primary": [f"127.0.0.1:{big.port}"], "recipients": "any"}
    mixed = ServeProcess(tmp_path / "mixed", domains=[one, two], delivery={"probe_interval": "1s"}, extra=dns)
    alone = ServeProcess(tmp_path / "alone", domains=[one], delivery={"probe_interval": "1s"}, extra=dns)
    with mixed, alone:
        mixed.start()
        alone.start()
        utf8 = "553 5.6.7 SMTPUTF8 is not supported for this destination"
        # SMTPUTF8 is refused only where an envelope address needs it: a UTF-8 recipient or sender
        assert wait_for(lambda: mail_rcpt(mixed, " SMTPUTF8", "\u00e4@one.test")[1] == utf8, timeout=20), mixed.log()
        assert mail_rcpt(mixed, " SMTPUTF8", "a@one.test", sender=UTF8_SENDER)[1] == utf8
        assert mail_rcpt(mixed, " SMTPUTF8", "\u00e4@two.test")[1] == "250 2.1.5 Ok"
        # all-ASCII addresses: the flag alone is no reason to refuse (it is dropped on the way, RFC 6531 §3.2)
        assert mail_rcpt(mixed, " SMTPUTF8", "a@one.test")[1] == "250 2.1.5 Ok"
        assert mail_rcpt(mixed, " SIZE=5000", "a@one.test")[1] == (
            "552 5.3.4 Message size exceeds the destination's maximum message size"
        )
        assert mail_rcpt(mixed, " SIZE=5000", "a@two.test")[1] == "250 2.1.5 Ok"
        assert mail_rcpt(mixed, " SIZE=500", "a@one.test")[1] == "250 2.1.5 Ok"
        # one domain only: refused at MAIL, before any RCPT
        assert wait_for(
            lambda: mail_rcpt(alone, " SMTPUTF8", "a@one.test", sender=UTF8_SENDER) == (utf8, None), timeout=20
        )
        assert mail_rcpt(alone, " SMTPUTF8", "a@one.test")[0] == "250 2.1.0 Ok"
        assert mail_rcpt(alone, "", "a@one.test") == ("250 2.1.0 Ok", "250 2.1.5 Ok")

        small.stop()  # the primary goes down; after a restart the last answer still holds
        alone.terminate()
        alone.start()
        assert mail_rcpt(alone, " SMTPUTF8", "a@one.test", sender=UTF8_SENDER) == (utf8, None)


def test_offer_refusals() -> None:
    offer = Offer.from_extensions({"size": "1000", "pipelining": ""}, 0.0)
    assert offer.refusal(smtputf8=False, body="8BITMIME", size=None) is not None  # no 8BITMIME
    assert offer.refusal(smtputf8=False, body="7BIT", size=1000) is None
    unlimited = Offer.from_extensions({"size": "", "8bitmime": "", "smtputf8": ""}, 0.0)
    assert unlimited.refusal(smtputf8=True, body="8BITMIME", size=10**9) is None
