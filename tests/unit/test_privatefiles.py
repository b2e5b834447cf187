"""Secrets are written through exclusive, no-follow temporary files: a symlink planted where the old code
wrote its temporary file is never followed, a second writer gets the first one's secret, and a short
admin token is replaced whole."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from backupmx.admin.auth import _generated_token
from backupmx.continuity.tokens import load_secret
from backupmx.privatefiles import make_private_dir, write_secret


def test_a_planted_symlink_is_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "admin.tmp").symlink_to(victim)  # where the token used to be written with O_TRUNC, following links
    token = _generated_token(data / "admin.token")
    assert victim.read_text() == "keep me\n"
    assert (data / "admin.token").read_text().strip() == token
    assert not (data / "admin.token").is_symlink()
    assert stat.S_IMODE((data / "admin.token").stat().st_mode) == 0o600


def test_the_first_secret_wins_and_a_short_token_is_replaced(tmp_path: Path) -> None:
    key = tmp_path / "continuity.key"
    assert write_secret(key, b"A" * 32) == b"A" * 32
    assert write_secret(key, b"B" * 32) == b"A" * 32  # linked, not renamed: the one already there stays
    assert load_secret(key) == b"A" * 32
    short = tmp_path / "admin.token"
    short.write_text("short\n")
    token = _generated_token(short)
    assert len(token) >= 16 and short.read_text().strip() == token
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin.token", "continuity.key"]  # no temp left


def test_a_private_dir_is_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        make_private_dir(tmp_path / "a" / "data")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "data").stat().st_mode) == 0o700
