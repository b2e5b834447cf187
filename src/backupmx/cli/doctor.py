"""`backupmx doctor`: the host checks before go-live (backupmx/doctor.py does the work), one ok/warn/fail
line each with the fix; exit 1 when any check fails."""

from __future__ import annotations

import argparse
from typing import Any

from backupmx.cli.spool_session import config_arg


def add_parser(sub: Any) -> None:
    doctor = sub.add_parser(
        "doctor", help="check this host before go-live: config, disk, port 25, DNS, clock, primaries, TLS, admin token"
    )
    config_arg(doctor)
    doctor.set_defaults(handler=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from backupmx.doctor import run

    return run(args.config)
