"""Spools named by URL, for commands that open one without a configuration (`spool copy --from/--to`):
`sqlite:DATA_DIR` (or its spool.db) and `postgresql://...`."""

from __future__ import annotations

from pathlib import Path

from backupmx.errors import ConfigError
from backupmx.spool import Spool

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_url(url: str, *, node: str) -> Spool:
    """A spool (not yet opened) for `sqlite:PATH` or `postgresql://...`."""
    if url.startswith(POSTGRES_SCHEMES):
        from backupmx.spool.postgres import PostgresSpool

        return PostgresSpool(url, node=node)
    if url.startswith("sqlite:"):
        from backupmx.spool.sqlite import DB_NAME, SqliteSpool

        path = Path(url.removeprefix("sqlite:").removeprefix("//"))
        if path.name == DB_NAME or path.is_file():
            path = path.parent
        return SqliteSpool(path, node=node)
    raise ConfigError(f"spool copy: {url!r}: expected sqlite:PATH or postgresql://...")
