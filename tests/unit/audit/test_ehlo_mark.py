"""node.ehlo: `check --config` warns when this node advertises what a primary's EHLO does not offer."""

from __future__ import annotations

from backupmx.audit.report import Level, Role, SmtpProbe
from backupmx.audit.rules import ehlo_marks
from backupmx.config import config_from_dict
from backupmx.reply import Reply


def probe(ehlo: str, role: Role = Role.PRIMARY) -> SmtpProbe:
    return SmtpProbe("mx1.example.test", "192.0.2.1", 25, role, ehlo=Reply(250, "", ehlo))


def test_ehlo_mark() -> None:
    cfg = config_from_dict({"server": {"max_message_size": "20MB"}})
    full = "mx1\nSIZE 50000000\n8BITMIME\nSMTPUTF8"
    assert ehlo_marks(cfg, [probe(full)]) == []
    marks = ehlo_marks(cfg, [probe("mx1\nSIZE 1000000\n8BITMIME")])
    assert [(m.check, m.level) for m in marks] == [("node.ehlo", Level.WARN)]
    assert "SMTPUTF8" in marks[0].text and "SIZE 20000000 (the primary takes 1000000)" in marks[0].text
    assert ehlo_marks(cfg, [probe("mx1\nPIPELINING", Role.BACKUP)]) == []  # only primaries count
    assert ehlo_marks(cfg, [probe("mx1\nSIZE\n8BITMIME\nSMTPUTF8")]) == []  # SIZE without a limit
