"""Files that hold mail or secrets: the data directory made 0700 when we create it (by chmod, not left to
the umask), private files created 0600, secrets written through an exclusive, no-follow temporary file
that is then linked or renamed into place, and the start-up check (`refuse_unsafe`) that stops `serve`
on a data directory others can write or a token others can read or write.
Refusals are ConfigError (the CLI prints them on one line and exits 2) naming the path and the chmod
that fixes it; OSError from creating or writing passes through to the caller.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
import tempfile
from pathlib import Path

from backupmx.config import Config
from backupmx.errors import ConfigError

ADMIN_TOKEN_FILE = "admin.token"  # in data_dir when [admin] token_file is unset (admin/auth.py)
CONTINUITY_KEY_FILE = "continuity.key"  # in data_dir when [continuity] secret_file is unset (continuity/tokens.py)
DIR_UNSAFE = 0o022  # group or others may write: they could swap the spool or the token under us
SECRET_UNSAFE = 0o026  # others may read or write, or the group may write (0640 for a group is allowed)


def make_private_dir(path: Path) -> None:
    """`path` (and missing parents) made; `path` itself 0700 when we create it. An existing directory is
    left as it is (refuse_unsafe judges it)."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return  # another process made it a moment ago
    os.chmod(path, 0o700)  # the umask may have taken bits from mkdir's mode; never give any


def create_private_file(path: Path) -> None:
    """An empty file 0600 when none exists (so SQLite, which gives -wal/-shm the database's mode, or an
    appender, never makes it with the umask's 0644); an existing file of ours loses group/other bits."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        tighten(path)
        return
    os.close(fd)


def tighten(path: Path) -> None:
    """A file of ours that exists loses its group and other bits (older versions made some 0644)."""
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)


def open_private_append(path: Path) -> int:
    """A descriptor appending to `path`, which is created 0600 if missing (an existing file keeps its mode:
    the operator chose it)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def write_secret(path: Path, data: bytes, *, replace: bool = False) -> bytes:
    """Write a secret 0600 through a temporary file opened O_EXCL|O_NOFOLLOW (mkstemp) in the same
    directory, fsync'd, then put in place. Without `replace`, a file that appeared meanwhile wins (link,
    not rename): the secret it holds is returned instead, so two processes end up with the same one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0600, O_EXCL|O_NOFOLLOW
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return path.read_bytes()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return data


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory; the file is synced
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None


def unsafe_dir(path: Path) -> str | None:
    """Why others could tamper with directory `path`, with the fix; None when it is fine or absent."""
    mode = _mode(path)
    if mode is None or not mode & DIR_UNSAFE:
        return None
    who = "other users" if mode & 0o002 else "its group"
    return (
        f"{path}: writable by {who} (mode {mode:04o}): they could change the queue or the admin token; "
        f"fix: chmod 700 {shlex.quote(str(path))}"
    )


def unsafe_secret(path: Path, what: str) -> str | None:
    """Why `path` (a token or key) is not private, with the fix; None when it is fine or absent."""
    mode = _mode(path)
    if mode is None or not mode & SECRET_UNSAFE:
        return None
    how = (
        "readable by other users"
        if mode & 0o004
        else "writable by other users"
        if mode & 0o002
        else "writable by its group"
    )
    return f"{path}: {how} (mode {mode:04o}): anyone who can read it {what}; fix: chmod 600 {shlex.quote(str(path))}"


def refuse_unsafe(cfg: Config) -> None:
    """Before `serve` binds anything: the data directory and every token or key it would use are private,
    else ConfigError naming each path and its chmod. The data directory is created 0700 when missing."""
    data_dir = cfg.server.data_dir
    problems = [unsafe_dir(data_dir)]
    if cfg.admin.listen:
        token = cfg.admin.token_file or data_dir / ADMIN_TOKEN_FILE
        problems.append(unsafe_secret(token, "can use the admin API"))
    if cfg.continuity.enabled:
        key = cfg.continuity.secret_file or data_dir / CONTINUITY_KEY_FILE
        problems.append(unsafe_secret(key, "can sign in to the emergency inbox as anyone"))
    found = [p for p in problems if p]
    if found:
        raise ConfigError("refusing to start: " + "; ".join(found))
    make_private_dir(data_dir)
