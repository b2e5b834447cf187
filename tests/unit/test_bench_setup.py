"""The benchmarks' backupmx setups (bench/backupmx_node.py) are configs backupmx accepts: the operator
setup with its recipient file, admin listener and token file, the lab setup, and in both a [dns] that
only reaches a loopback port. If a config key they use changes, the benches would measure nothing."""

from __future__ import annotations

import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from bench.backupmx_node import OTHER_RECIPIENTS, BackupmxNode, Setup, setup_description


@pytest.mark.parametrize("setup", ["operator", "lab"])
def test_setup_is_a_config_backupmx_accepts(tmp_path: Path, setup: Setup) -> None:
    node = BackupmxNode(tmp_path / setup, domains={"example.test": 1}, setup=setup, recipients=["Alice@example.test"])
    node.cli("config", "check")  # raises on a non-zero exit
    cfg = tomllib.loads(node.config_path.read_text())
    (ns,) = cfg["dns"]["nameservers"]
    assert ns.startswith("127.0.0.1:")
    assert setup.split()[0] in setup_description(setup)
    if setup == "lab":
        assert cfg["domains"][0]["recipients"] == "any" and cfg["admin"]["listen"] == ""
        return
    assert "log" not in cfg  # the mail log goes to stderr, the default
    rfile = Path(cfg["domains"][0]["recipients"].removeprefix("file:"))
    lines = [ln for ln in rfile.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "alice@example.test" and len(lines) == 1 + OTHER_RECIPIENTS
    assert cfg["admin"]["listen"] == f"127.0.0.1:{node.admin_port}"
    assert stat.S_IMODE(Path(cfg["admin"]["token_file"]).stat().st_mode) == 0o600


def test_asyncio_loop_blocks_uvloop_for_serve_only(tmp_path: Path) -> None:
    """--asyncio-loop: serve's environment makes `import uvloop` fail (so serve falls back to asyncio)."""
    node = BackupmxNode(tmp_path, domains={"example.test": 1}, asyncio_loop=True)
    assert node.env is not None
    probe = [sys.executable, "-c", "import uvloop"]
    res = subprocess.run(probe, env=node.env, capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "blocked by the bench" in res.stderr
    assert BackupmxNode(tmp_path / "plain", domains={"example.test": 1}).env is None
