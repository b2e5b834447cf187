"""Which spool backend a node uses, and opening it: `open_spool` for a configuration (`serve` and every
command that works beside it), `open_url` for a URL given on the command line (`spool copy --from/--to`:
`sqlite:DATA_DIR` or its spool.db, `postgresql://...`)."""

from __future__ import annotations

from pathlib import Path

from backupmx.clock import Clock
from backupmx.config import POSTGRES_SCHEMES, Config
from backupmx.errors import ConfigError
from backupmx.extras import POSTGRES, require
from backupmx.privatefiles import make_private_dir
from backupmx.spool import Spool

__all__ = ["POSTGRES_SCHEMES", "open_spool", "open_url"]


async def open_spool(cfg: Config, *, clock: Clock | None = None) -> Spool:
    """The configured spool backend, opened (schema created or migrated)."""
    spool: Spool
    if cfg.spool.url and cfg.spool.url.startswith(POSTGRES_SCHEMES):
        require(POSTGRES, "spool.url")  # checked with the config already; a broken install fails here
        from backupmx.spool.postgres import PostgresSpool  # type: ignore[import-not-found,unused-ignore]

        spool = PostgresSpool(cfg.spool.url, node=cfg.server.node, clock=clock)
    else:
        from backupmx.spool.sqlite import SqliteSpool

        make_private_dir(cfg.server.data_dir)  # 0700 by chmod, whatever the umask
        spool = SqliteSpool(cfg.server.data_dir, node=cfg.server.node, clock=clock)
    await spool.open()
    return spool


def open_url(url: str, *, node: str) -> Spool:
    """A spool (not yet opened) for `sqlite:PATH` or `postgresql://...`."""
    if url.startswith(POSTGRES_SCHEMES):
        require(POSTGRES, "spool copy: a postgresql:// URL")
        from backupmx.spool.postgres import PostgresSpool

        return PostgresSpool(url, node=node)
    if url.startswith("sqlite:"):
        from backupmx.spool.sqlite import DB_NAME, SqliteSpool

        path = Path(url.removeprefix("sqlite:").removeprefix("//"))
        if path.name == DB_NAME or path.is_file():
            path = path.parent
        return SqliteSpool(path, node=node)
    raise ConfigError(f"spool copy: {url!r}: expected sqlite:PATH or postgresql://...")
