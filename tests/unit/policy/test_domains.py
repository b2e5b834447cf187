"""Relay control (RELIABILITY.md #34/#35) and the check chain."""

from __future__ import annotations

import pytest

from backupmx.config import config_from_dict
from backupmx.policy import Action, SessionInfo, Stage, run_checks
from backupmx.policy.domains import RelayControl, build_checks, domain_of
from backupmx.policy.recipients import RecipientCheck

SESSION = SessionInfo(client_ip="192.0.2.1")


@pytest.mark.parametrize(
    "address,ok",
    [
        ("u@ours.test", True),
        ("u@OURS.TEST", True),
        ("U.Name@Ours.Test", True),
        ('"u@evil.test"@ours.test', True),  # quoted local part: opaque, the domain is ours
        ("u%evil.test@ours.test", True),  # % and ! are plain characters: goes to OUR primary, verbatim
        ("evil.test!u@ours.test", True),
        ("u@other.test", True),
        ("u@ours.test.", False),
        ("u@ours.test.evil.test", False),
        ("u@evil-ours.test", False),
        ("u@sub.ours.test", False),
        ("u@[203.0.113.5]", False),
        ("u@[IPv6:2001:db8::1]", False),
        ("u@evil.test", False),
        ("postmaster", False),
        ("", False),
    ],
)
async def test_relay_control(address: str, ok: bool) -> None:
    rc = RelayControl(["ours.test", "Other.Test"])
    v = await rc.check(Stage.RCPT, SESSION, address)
    if ok:
        assert v.action is Action.CONTINUE
    else:
        assert v.action is Action.REJECT and v.reply is not None
        assert (v.reply.code, v.reply.status, v.reply.text) == (554, "5.7.1", f"<{address}>: Relay access denied")


def test_domain_of() -> None:
    assert domain_of('"a@b"@C.test') == "c.test"
    assert domain_of("nodomain") == ""
    assert domain_of("@x.test") == ""


async def test_build_checks_order_and_run() -> None:
    cfg = config_from_dict({"domains": [{"name": "ours.test", "recipients": ["alice@ours.test"]}]})
    checks = build_checks(cfg)
    assert [type(c) for c in checks] == [RelayControl, RecipientCheck]
    v = await run_checks(checks, Stage.RCPT, SESSION, "alice@ours.test")
    assert v.action is Action.ACCEPT
    v = await run_checks(checks, Stage.RCPT, SESSION, "bob@ours.test")
    assert v.reply is not None and str(v.reply) == "550 5.1.1 <bob@ours.test>: Recipient address rejected: User unknown"
    v = await run_checks(checks, Stage.RCPT, SESSION, "alice@evil.test")
    assert v.reply is not None and v.reply.status == "5.7.1"
    assert (await run_checks(checks, Stage.MAIL, SESSION, "anyone@anywhere.test")).action is Action.ACCEPT
