"""node.arc-key: `backupmx check --config` tells whether the ARC key of [policy] arc_key is published."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupmx.audit.report import Level
from backupmx.audit.rules import arc_marks
from backupmx.config import config_from_dict
from tests.support.rsa_key import new_rsa_key

pytest.importorskip("dkim")


def key(tmp: Path, name: str) -> tuple[Path, str]:
    pem = tmp / f"{name}.pem"
    return pem, new_rsa_key(pem, 1024)


def test_arc_key_published_or_not(tmp_path: Path) -> None:
    pem, public = key(tmp_path, "arc")
    _, other = key(tmp_path, "other")
    cfg = config_from_dict({"policy": {"arc_key": str(pem), "arc_selector": "arc", "arc_domain": "backup.test"}})

    def level(records: list[str] | None, error: str | None = None, pem_bytes: bytes | None = None) -> Level:
        marks = arc_marks(cfg, pem_bytes if pem_bytes is not None else pem.read_bytes(), records, error)
        assert [m.subject for m in marks] == ["arc._domainkey.backup.test"]
        return marks[0].level

    assert level([f"v=DKIM1; k=rsa; p={public}"]) is Level.OK
    assert level([f"v=DKIM1; k=rsa; p={public[:40]} {public[40:]}"]) is Level.OK  # split strings, spaces
    assert level([]) is Level.FAIL
    assert level([f"v=DKIM1; k=rsa; p={other}"]) is Level.FAIL
    assert level(None, error="timeout") is Level.WARN
    assert level([f"v=DKIM1; p={public}"], pem_bytes=b"not a key") is Level.FAIL
    assert arc_marks(config_from_dict({}), None, None, None) == []
