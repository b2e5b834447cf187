"""`backupmx config check`: read and validate a configuration file (config.py does the work) and say what
it protects."""

from __future__ import annotations

import argparse
from typing import Any

from backupmx.cli.exits import EXIT_OK
from backupmx.cli.spool_session import config_arg
from backupmx.config import load_config, require_domains


def add_parser(sub: Any) -> None:
    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    check = config_sub.add_parser("check", help="validate a configuration file")
    config_arg(check)
    check.set_defaults(handler=cmd_config_check)


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    require_domains(cfg)  # a file that protects nothing is not "ok"
    print(f"{cfg.source}: ok ({len(cfg.domains)} domain(s): {', '.join(d.name for d in cfg.domains)})")
    return EXIT_OK
