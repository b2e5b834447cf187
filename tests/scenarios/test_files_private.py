"""The files of a real `backupmx serve` are private: the data directory it creates is 0700 whatever the
umask, metrics.db, the mail log and admin.token are 0600; and `serve` refuses to start (exit 2, one
line naming the path and the chmod that fixes it, no traceback) on a data directory others can write
or a token file others can read."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.serve import ServeProcess, free_port


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, which used to make the data directory 0755 and the files 0644."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def node(tmp: Path, **extra: object) -> ServeProcess:
    return ServeProcess(
        tmp,
        admin=True,
        extra={
            "log": {"maillog": str(tmp / "mail.log")},
            "continuity": {"enabled": True, "listen": f"127.0.0.1:{free_port()}"},
            "dns": {"nameservers": [f"127.0.0.1:{free_port()}"]},
            **extra,
        },
    )


def refused(n: ServeProcess) -> str:
    n.start(wait=False)
    assert n.proc is not None
    code = n.proc.wait(timeout=30)
    out = n.log()
    assert code == 2, out
    assert "Traceback" not in out
    return out


@pytest.mark.usefixtures("umask_022")
def test_serve_creates_every_private_file_private(tmp_path: Path) -> None:
    with node(tmp_path) as n:
        n.start()
        data = n.data_dir
        deadline = time.monotonic() + 20
        while not ((data / "metrics.db").exists() and (data / "continuity.key").exists()):
            assert time.monotonic() < deadline, n.log()
            time.sleep(0.05)
        assert mode(data) == 0o700
        for name in ("admin.token", "continuity.key", "metrics.db"):
            assert mode(data / name) == 0o600, name
        assert mode(tmp_path / "mail.log") == 0o600
        for side in ("metrics.db-wal", "metrics.db-shm"):
            if (data / side).exists():
                assert mode(data / side) == 0o600, side
        assert not [p.name for p in data.iterdir() if p.name.endswith(".tmp")]


def test_serve_refuses_a_data_dir_others_can_write(tmp_path: Path) -> None:
    n = node(tmp_path)
    n.data_dir.mkdir()
    os.chmod(n.data_dir, 0o777)
    out = refused(n)
    assert f"{n.data_dir}: writable by other users (mode 0777)" in out
    assert f"chmod 700 {n.data_dir}" in out
    assert not (n.data_dir / "spool.db").exists()  # nothing opened, nothing bound


def test_serve_refuses_a_token_file_others_can_read(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("a-long-enough-admin-token-0123456789\n")
    os.chmod(token, 0o644)
    n = node(tmp_path)
    n.config_path.write_text(n.config_path.read_text().replace("[admin]\n", f'[admin]\ntoken_file = "{token}"\n', 1))
    out = refused(n)
    assert f"{token}: readable by other users (mode 0644)" in out and f"chmod 600 {token}" in out
    os.chmod(token, 0o600)  # the fix it names works
    with n:
        n.start()
