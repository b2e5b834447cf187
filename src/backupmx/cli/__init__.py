"""The `backupmx` command. One module per command group, each a thin layer over the package that owns the
work: serve, config, doctor, queue, check, spool, recipients, drill, status, access (and continuity). The tree of
commands is assembled here, in help order; `main` runs the chosen handler and turns errors into one line on
stderr and an exit code (2 usage or configuration, 1 a failed action), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from backupmx import __version__
from backupmx.cli import access, check, config, doctor, drill, queue, recipients, serve, spool, status
from backupmx.cli.exits import EXIT_FAIL, EXIT_USAGE
from backupmx.errors import BackupMXError, ConfigError

# Each group adds its own subcommands (flags sit next to the handler that reads them); the order is the
# order of `backupmx --help`.
GROUPS: tuple[Callable[[Any], None], ...] = (
    serve.add_parser,
    config.add_parser,
    doctor.add_parser,
    queue.add_parser,
    check.add_parser,
    spool.add_parser,
    recipients.add_parser,
    drill.add_parser,
    status.add_parser,
    access.add_parser,  # access, continuity
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return handler(args)
    except ConfigError as e:
        print(f"backupmx: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BackupMXError as e:
        print(f"backupmx: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="backupmx", description="A backup MX that holds mail while the primary is down.")
    p.add_argument("--version", action="version", version=f"backupmx {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in GROUPS:
        add(sub)
    return p


__all__ = ["build_parser", "main"]
