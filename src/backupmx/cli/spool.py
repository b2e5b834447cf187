"""`backupmx spool ...`: the spool's database itself, apart from the mail in it.

    backupmx spool migrate --config FILE          create or upgrade the schema (also done at every start)
    backupmx spool copy --from URL --to URL       move a queue between backends (sqlite:DIR, postgresql://...)
    backupmx spool nodes --config FILE            the nodes sharing a PostgreSQL spool, last seen first

The spool package does the work (spool/copy.py, spool/backends.py, the backends' migrations). Errors are one
line on stderr: exit 2 for usage or configuration, 1 for a failed action (a copy that left a message behind).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from datetime import UTC, datetime
from typing import Any

from backupmx.cli.exits import EXIT_FAIL, EXIT_OK, EXIT_USAGE
from backupmx.config import load_config
from backupmx.errors import ConfigError
from backupmx.spool.backends import POSTGRES_SCHEMES, open_url
from backupmx.spool.copy import CopyProgress, copy_spool


def add_parser(subparsers: Any) -> None:
    """Add `spool migrate|copy|nodes` to the `backupmx` command's subparsers."""
    spool = subparsers.add_parser("spool", help="the spool database: migrate, copy between backends, nodes")
    sub = spool.add_subparsers(dest="spool_command", metavar="ACTION")
    spool.set_defaults(handler=lambda _args: _usage(spool))

    migrate = sub.add_parser("migrate", help="create or upgrade the spool's schema (serve also does it at start)")
    migrate.add_argument("--config", "-c", required=True, metavar="FILE", help="the backupmx TOML file")
    migrate.set_defaults(handler=cmd_spool_migrate)

    copy = sub.add_parser("copy", help="copy every pending message from one spool to another (stop the nodes first)")
    copy.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="URL",
        help="sqlite:DATA_DIR (or its spool.db) or postgresql://...",
    )
    copy.add_argument("--to", dest="target", required=True, metavar="URL", help="same forms as --from")
    copy.add_argument("--config", "-c", metavar="FILE", help="optional: takes this node's name from it")
    copy.add_argument("--no-verify", action="store_true", help="do not read each copy back")
    copy.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    copy.set_defaults(handler=cmd_spool_copy)

    nodes = sub.add_parser("nodes", help="the nodes sharing a PostgreSQL spool")
    nodes.add_argument("--config", "-c", required=True, metavar="FILE", help="the backupmx TOML file")
    nodes.set_defaults(handler=cmd_spool_nodes)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


# --- migrate -------------------------------------------------------------------------------------
def cmd_spool_migrate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    url = cfg.spool.url
    if url and url.startswith(POSTGRES_SCHEMES):
        before, after = asyncio.run(_migrate_postgres(url, cfg.server.node))
        if before == after:
            print(f"spool schema is up to date (version {after})")
        else:
            print(f"spool schema migrated from version {before} to {after}")
        return EXIT_OK

    async def sqlite() -> None:
        from backupmx.spool.sqlite import SqliteSpool

        spool = SqliteSpool(cfg.server.data_dir, node=cfg.server.node)
        await spool.open()  # creates or migrates the schema
        await spool.close()

    asyncio.run(sqlite())
    print(f"spool schema is up to date ({cfg.server.data_dir}/spool.db)")
    return EXIT_OK


async def _migrate_postgres(url: str, node: str) -> tuple[int, int]:
    from backupmx.spool.postgres import PostgresSpool

    spool = PostgresSpool(url, node=node)
    return await spool.migrate()


# --- copy ----------------------------------------------------------------------------------------
class _Progress:
    """Text progress on stderr: one line redrawn on a terminal, a line per 10% otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.last_tenth = -1
        self.shown = False

    def __call__(self, p: CopyProgress) -> None:
        if self.quiet:
            return
        fraction = p.done / p.total if p.total else 1.0
        width = 30
        bar = "#" * int(fraction * width) + "-" * (width - int(fraction * width))
        rate = p.bytes_copied / max(time.monotonic() - self.started, 1e-6) / 1e6
        line = f"[{bar}] {p.done}/{p.total} messages, {p.bytes_copied / 1e6:.1f} MB, {rate:.1f} MB/s"
        if self.tty:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
            self.shown = True
        elif int(fraction * 10) != self.last_tenth:
            self.last_tenth = int(fraction * 10)
            print(line, file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.shown:
            print(file=sys.stderr)


def cmd_spool_copy(args: argparse.Namespace) -> int:
    if args.source == args.target:
        raise ConfigError("spool copy: --from and --to are the same spool")
    node = f"copy@{socket.gethostname()}"
    if args.config:
        node = load_config(args.config).server.node
    src = open_url(args.source, node=node)
    dst = open_url(args.target, node=node)
    progress = _Progress(args.quiet)

    async def go() -> int:
        await src.open()
        try:
            await dst.open()
            try:
                report = await copy_spool(src, dst, progress, verify=not args.no_verify)
            finally:
                await dst.close()
        finally:
            await src.close()
        progress.end()
        print(
            f"copied {report.copied} message(s) ({report.bytes_copied} bytes), "
            f"{report.already_there} already there, {len(report.failed)} failed"
        )
        if report.approximate:
            print(
                f"{len(report.approximate)} copied without their full history (the destination cannot "
                "import it): pending recipients queued and due now, held ones held",
                file=sys.stderr,
            )
        for qid, why in report.failed:
            print(f"backupmx: spool copy: {qid}: {why}", file=sys.stderr)
        return EXIT_FAIL if report.failed else EXIT_OK

    return asyncio.run(go())


# --- nodes ---------------------------------------------------------------------------------------
def cmd_spool_nodes(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    url = cfg.spool.url
    if not (url and url.startswith(POSTGRES_SCHEMES)):
        print(f"{cfg.server.node} (the SQLite spool is never shared)")
        return EXIT_OK

    async def go() -> int:
        from backupmx.spool.postgres import PostgresSpool

        spool = PostgresSpool(url, node=cfg.server.node)
        await spool.open()
        try:
            nodes = await spool.nodes()
        finally:
            await spool.close()
        now = time.time()
        print(f"{'NODE':24s} {'HOST':24s} {'PID':>7s} {'VERSION':10s} {'STARTED':20s} LAST SEEN")
        for n in nodes:
            started = datetime.fromtimestamp(n.started_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{n.name:24s} {n.host:24s} {n.pid:7d} {n.version:10s} {started:20s} {now - n.seen_at:.0f}s ago")
        return EXIT_OK

    return asyncio.run(go())


__all__ = ["add_parser", "cmd_spool_copy", "cmd_spool_migrate", "cmd_spool_nodes"]
