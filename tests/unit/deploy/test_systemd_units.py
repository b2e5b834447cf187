"""deploy/systemd: both units pass `systemd-analyze verify` without a single warning (it exits 0 even on
an unknown key, so the output is checked too), keep the settings the operator's guide promises, and stay
well hardened by `systemd-analyze security`'s measure.

The units name /opt/backupmx/bin/backupmx, absent here: each test verifies a copy that points at this
checkout's own `backupmx` script, with everything else unchanged.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
UNITS = REPO / "deploy" / "systemd"
INSTALLED = "/opt/backupmx/bin/backupmx"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)")

# unit file -> the name to verify (a template is verified through one instance)
CASES = {"backupmx.service": "backupmx.service", "backupmx@.service": "backupmx@mx2.service"}


def local_copy(tmp_path: Path, unit: str) -> Path:
    script = Path(sys.executable).with_name("backupmx")
    assert script.exists(), f"{script}: run `pip install -e .` first"
    text = (UNITS / unit).read_text()
    assert INSTALLED in text
    (tmp_path / unit).write_text(text.replace(INSTALLED, str(script)))
    return tmp_path / CASES[unit]


def settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("unit", sorted(CASES))
def test_verify_is_clean(tmp_path: Path, unit: str) -> None:
    assert ANALYZE is not None
    res = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(local_copy(tmp_path, unit))], capture_output=True, text=True, timeout=60
    )
    ours = [line for line in (res.stdout + res.stderr).splitlines() if "backupmx" in line]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr


@pytest.mark.parametrize("unit", sorted(CASES))
def test_the_promised_settings(unit: str) -> None:
    s = settings(unit)
    expected = {
        "Type": ["notify"],
        "User": ["backupmx"],
        "Group": ["backupmx"],
        "AmbientCapabilities": ["CAP_NET_BIND_SERVICE"],
        "CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
    }
    for key, value in expected.items():
        assert s.get(key) == value, key
    assert "@system-service" in s["SystemCallFilter"]
    assert s["StateDirectory"] == (["backupmx"] if unit == "backupmx.service" else ["backupmx/%i"])
    config = "/etc/backupmx/backupmx.toml" if unit == "backupmx.service" else "/etc/backupmx/%i.toml"
    assert s["ExecStart"] == [f"{INSTALLED} serve --config {config}"]


def test_exposure_stays_low(tmp_path: Path) -> None:
    assert ANALYZE is not None
    res = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(local_copy(tmp_path, "backupmx.service"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for backupmx\.service: (\d+\.\d+)", res.stdout + res.stderr)
    assert m is not None, res.stdout + res.stderr
    assert float(m.group(1)) <= 3.0, res.stdout  # 2.0 when written; systemd calls <= 3.9 "OK"
