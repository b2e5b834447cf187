"""ENVID and ORCPT that decode to something a DSN could never carry (issue 12 item 2): refused at the
command with 501 5.5.4 (RFC 3461 §4.4: ENVID is printable US-ASCII once decoded); good values pass."""

from __future__ import annotations

import pytest

from backupmx.smtp.xtext import decode_unitext, decode_xtext, envid_carriable, orcpt_carriable
from tests.unit.smtp.harness import Harness

ENVID_BAD = "501 5.5.4 Bad ENVID parameter: must be printable US-ASCII once decoded"
ORCPT_BAD = "501 5.5.4 Bad ORCPT parameter: control characters once decoded"


@pytest.mark.parametrize(
    ("mail", "reply"),
    [
        ("MAIL FROM:<s@x.test> ENVID=+0D+0AX-Injected:+20yes", ENVID_BAD),
        ("MAIL FROM:<s@x.test> ENVID=a+00b", ENVID_BAD),
        ("MAIL FROM:<s@x.test> ENVID=a+7Fb", ENVID_BAD),
        ("MAIL FROM:<s@x.test> ENVID=caf+C3+A9", ENVID_BAD),  # encoded 8-bit is not US-ASCII
        ("MAIL FROM:<s@x.test> SMTPUTF8 ENVID=a+0Ab", ENVID_BAD),
        ("MAIL FROM:<s@x.test> ENVID=ok+20id+2B1", "250 2.1.0 Ok"),
        ("MAIL FROM:<s@x.test> SMTPUTF8 ENVID=caf\u00e9", "250 2.1.0 Ok"),
    ],
)
def test_envid(mail: str, reply: str) -> None:
    h = Harness()
    h.ehlo()
    assert h.feed(f"{mail}\r\n".encode()) == [reply]


@pytest.mark.parametrize(
    ("mail", "param", "reply"),
    [
        ("", "ORCPT=rfc822;a+0D+0Ab@d.test", ORCPT_BAD),
        ("", "ORCPT=rfc822;a+09b@d.test", ORCPT_BAD),
        (" SMTPUTF8", "ORCPT=utf-8;a\\x{D}\\x{A}b@d.test", ORCPT_BAD),
        (" SMTPUTF8", "ORCPT=utf-8;a\\x{2028}b@d.test", ORCPT_BAD),
        ("", "ORCPT=rfc822;u+40ours.test", "250 2.1.5 Ok"),
        (" SMTPUTF8", "ORCPT=utf-8;j\\x{F6}rg@d.test", "250 2.1.5 Ok"),
    ],
)
def test_orcpt(mail: str, param: str, reply: str) -> None:
    h = Harness()
    h.ehlo()
    assert h.feed(f"MAIL FROM:<s@x.test>{mail}\r\n".encode()) == ["250 2.1.0 Ok"]
    assert h.feed(f"RCPT TO:<u@ours.test> {param}\r\n".encode()) == [reply]


def test_decoders() -> None:
    assert decode_xtext("a+2Bb+3D") == "a+b="
    assert decode_xtext("+C3+BC") == "\u00fc"
    assert decode_xtext("+FF") == "\ufffd"  # not UTF-8: replaced, never raised
    assert decode_unitext("j\\x{F6}rg+40x") == "j\u00f6rg@x"
    assert decode_unitext("\\x{D800}\\x{110000}") == "\ufffd\ufffd"
    assert envid_carriable("a+20b") and not envid_carriable("a+0D")
    assert orcpt_carriable("rfc822", "a+40b") and not orcpt_carriable("UTF-8", "\\x{85}")
