"""How a one-shot command meets the spool: `config_arg` adds the --config it needs, `using_spool` opens the
spool beside any running `serve`, runs one coroutine over it and always closes it, and `with_spool` turns
`async fn(args, config, spool) -> exit code` into an argparse handler that reads the config first. Errors
propagate to the caller (backupmx.cli.main prints them as one line).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from backupmx.config import Config, load_config
from backupmx.spool import Spool
from backupmx.spool.backends import open_spool

T = TypeVar("T")
SpoolCommand = Callable[[argparse.Namespace, Config, Spool], Awaitable[int]]


def config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the backupmx TOML file")


async def using_spool(cfg: Config, fn: Callable[[Spool], Awaitable[T]]) -> T:
    """fn over this node's spool, closed afterwards whatever fn did."""
    spool = await open_spool(cfg)
    try:
        return await fn(spool)
    finally:
        await spool.close()


def with_spool(fn: SpoolCommand) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        cfg = load_config(args.config)
        return asyncio.run(using_spool(cfg, lambda spool: fn(args, cfg, spool)))

    return run
