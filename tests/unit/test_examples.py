"""examples/: every file passes the real `backupmx config check` and is referenced from the README, and the
production example fits the systemd unit (its data_dir is the unit's StateDirectory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from backupmx.config import load_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.toml"))


def test_the_examples_are_there() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"quickstart.toml", "production.toml", "two-domains.toml", "three-nodes-postgres.toml"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_config_check_accepts(example: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "backupmx.cli", "config", "check", "--config", str(example)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert f"{example}: ok" in res.stdout and not res.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_referenced_from_the_readme(example: Path) -> None:
    assert f"examples/{example.name}" in (REPO / "README.md").read_text()


def test_production_fits_the_systemd_unit() -> None:
    cfg = load_config(REPO / "examples" / "production.toml")
    unit = (REPO / "deploy" / "systemd" / "backupmx.service").read_text()
    assert str(cfg.server.data_dir) == "/var/lib/backupmx" and "StateDirectory=backupmx\n" in unit
    assert cfg.admin.token_file is not None and cfg.server.tls_cert is not None and cfg.canary and cfg.alerts
