"""`backupmx serve`: the SMTP server, delivery and the admin listener in the foreground (service.py builds
and runs them)."""

from __future__ import annotations

import argparse
from typing import Any

from backupmx.cli.spool_session import config_arg
from backupmx.config import load_config


def add_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the SMTP server, delivery and admin listener in the foreground")
    config_arg(serve)
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from backupmx.service import run_service

    cfg = load_config(args.config)
    return run_service(cfg)
