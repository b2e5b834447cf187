"""`recipients = "any"` with `accept = "always"` is warned about by `config check` and `check --config`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backupmx.audit.report import DnsView, Level
from backupmx.audit.rules import node_marks
from backupmx.config import config_from_dict

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("domain", "warned"),
    [
        ({}, True),  # the defaults: "any" and "always"
        ({"recipients": "any", "accept": "when_primary_down"}, False),
        ({"recipients": ["alice@example.test"]}, False),
        ({"recipients": "verify"}, False),
    ],
)
def test_node_recipients_mark(domain: dict[str, Any], warned: bool) -> None:
    cfg = config_from_dict(
        {"server": {"hostname": "backup.example.test"}, "domains": [{"name": "example.test", **domain}]}
    )
    found = {(m.check, m.level) for m in node_marks(DnsView(domain="example.test", resolver="test"), cfg)}
    assert (("node.recipients", Level.WARN) in found) is warned


def test_config_check_warns(tmp_path: Path) -> None:
    cfg = tmp_path / "risky.toml"
    cfg.write_text('[[domains]]\nname = "open.test"\n\n[[domains]]\nname = "listed.test"\nrecipients = ["a"]\n')
    res = subprocess.run(
        [sys.executable, "-m", "backupmx.cli", "config", "check", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "domains[0](open.test).recipients" in warnings[0]
    quick = subprocess.run(
        [
            sys.executable,
            "-m",
            "backupmx.cli",
            "config",
            "check",
            "--config",
            str(REPO / "examples" / "quickstart.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert quick.returncode == 0 and "warning" not in quick.stderr
