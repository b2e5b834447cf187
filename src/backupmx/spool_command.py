"""How a one-shot CLI command meets the spool: `config_arg` adds the --config it needs, and `with_spool`
turns `async fn(args, config, spool) -> exit code` into an argparse handler that reads the config, opens
the spool beside any running `serve`, runs fn and always closes the spool. Errors propagate to the caller
(backupmx.cli prints them as one line).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

from backupmx.config import Config, load_config
from backupmx.spool import Spool

SpoolCommand = Callable[[argparse.Namespace, Config, Spool], Awaitable[int]]


def config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the backupmx TOML file")


def with_spool(fn: SpoolCommand) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        cfg = load_config(args.config)

        async def go() -> int:
            from backupmx.service import open_spool

            spool = await open_spool(cfg)
            try:
                return await fn(args, cfg, spool)
            finally:
                await spool.close()

        return asyncio.run(go())

    return run
