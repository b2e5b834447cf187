"""Optional parts and a config that protects nothing: one clear line and exit 2, never a traceback.

Each case runs the real `backupmx` command in its own process; "asyncpg is not installed" is made true
for that process only by blocking the import (sys.modules["asyncpg"] = None), as on a host where
`pip install backupmx` ran without the postgres extra.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backupmx.config import config_from_dict
from backupmx.errors import ConfigError
from backupmx.extras import POSTGRES, OptionalPart, installed, require
from tests.support.ports import free_port, smtp_banner
from tests.support.serve import ServeProcess

# `python -m backupmx.cli ARGS` with some modules made unimportable first
_BLOCKED_RUN = (
    "import runpy, sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None\n"
    "sys.argv = ['backupmx', *sys.argv[2:]]\n"
    "runpy.run_module('backupmx.cli', run_name='__main__', alter_sys=True)\n"
)
POSTGRES_MESSAGE = "spool.url needs the PostgreSQL driver: pip install 'backupmx[postgres]'"


def backupmx(*args: str, blocked: str = "") -> subprocess.CompletedProcess[str]:
    argv = (
        [sys.executable, "-c", _BLOCKED_RUN, blocked, *args]
        if blocked
        else [sys.executable, "-m", "backupmx.cli", *args]
    )
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def write_config(tmp_path: Path, body: str) -> Path:
    # [dns] points at a loopback port where nothing listens: no lookup may reach the machine's resolver
    path = tmp_path / "backupmx.toml"
    path.write_text(
        f'[server]\nhostname = "backup.test"\nlisten = ["127.0.0.1:{free_port()}"]\n'
        f'data_dir = "{tmp_path / "data"}"\n[admin]\nlisten = ""\n'
        f'[dns]\nnameservers = ["127.0.0.1:{free_port()}"]\n{body}'
    )
    return path


DOMAIN = '[[domains]]\nname = "example.test"\nprimary = ["127.0.0.1:2"]\n'
PG = '[spool]\nurl = "postgresql://backupmx@127.0.0.1:1/backupmx"\n'


@pytest.mark.parametrize("command", [["config", "check"], ["serve"], ["spool", "migrate"]])
def test_postgres_url_without_the_driver_says_what_to_install(tmp_path: Path, command: list[str]) -> None:
    cfg = write_config(tmp_path, DOMAIN + PG)
    res = backupmx(*command, "--config", str(cfg), blocked="asyncpg")
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == f"backupmx: {cfg}: {POSTGRES_MESSAGE}"
    assert not (tmp_path / "data").exists()


def test_spool_copy_to_postgres_without_the_driver(tmp_path: Path) -> None:
    res = backupmx(
        "spool", "copy", "--from", f"sqlite:{tmp_path}", "--to", "postgresql://u@127.0.0.1:1/db", blocked="asyncpg"
    )
    assert res.returncode == 2, res.stderr
    assert "spool copy: a postgresql:// URL needs the PostgreSQL driver: pip install 'backupmx[postgres]'" in res.stderr
    assert "Traceback" not in res.stderr


def test_serve_without_uvloop_runs_on_asyncio(tmp_path: Path) -> None:
    """uvloop only makes serve faster: with it unimportable (a sitecustomize blocks it, as on a platform
    where it does not build), the real serve starts, answers 220 and stops cleanly."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['uvloop'] = None\n")
    node = ServeProcess(tmp_path / "node", extra={"dns": {"nameservers": [f"127.0.0.1:{free_port()}"]}})
    try:
        node.start(env={"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
        banner = smtp_banner(node.host, node.port)
        assert banner is not None and banner.startswith(b"220 ")
        assert node.terminate() == 0, node.log()
        assert "Traceback" not in node.log()
    finally:
        node.kill()


@pytest.mark.parametrize("command", [["config", "check"], ["serve"]])
def test_a_config_without_domains_is_refused(tmp_path: Path, command: list[str]) -> None:
    cfg = write_config(tmp_path, "")
    res = backupmx(*command, "--config", str(cfg))
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{cfg}: domains: no [[domains]]" in res.stderr and "Traceback" not in res.stderr
    assert "ok" not in res.stdout
    assert not (tmp_path / "data").exists()  # serve stopped before creating anything


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    res = backupmx("config", "check", "--config", str(empty))
    assert res.returncode == 2 and "no [[domains]]" in res.stderr


def test_spool_url_must_be_postgresql() -> None:
    with pytest.raises(ConfigError, match=r"<dict>: spool.url: must be a postgresql://"):
        config_from_dict({"spool": {"url": "mysql://db/backupmx"}})


def test_installed_and_require() -> None:
    assert installed(POSTGRES)  # the test extras install asyncpg
    nothing = OptionalPart("backupmx_no_such_module", "nothing", "a part that does not exist")
    assert not installed(nothing)
    with pytest.raises(ConfigError, match=r"^x.y needs a part that does not exist: pip install 'backupmx\[nothing\]'$"):
        require(nothing, "x.y")


def test_doctor_names_a_missing_uvloop(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, DOMAIN + '[delivery]\nprobe_timeout = "1s"\n')
    cfg.write_text(cfg.read_text().replace("[dns]\n", '[dns]\ntimeout = "1s"\n'))
    res = backupmx("doctor", "--config", str(cfg), blocked="uvloop")
    install = [line for line in res.stdout.splitlines() if line.startswith("warn  install ")]
    assert install and "uvloop is missing" in install[0], res.stdout + res.stderr
    assert "fix: pip install 'backupmx[fast]'" in res.stdout and "Traceback" not in res.stderr
