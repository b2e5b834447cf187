"""`backupmx drill DOMAIN --for 10m [--wait]`, `--stop`, `--report`: ask the running `serve` to hold a domain's
delivery as if its primary were down, then verify. monitor/drill.py does the work (the request and its answer
through the spool's kv, the runner inside `serve`, the report); this module parses, asks and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from backupmx.cli.exits import EXIT_FAIL, EXIT_OK
from backupmx.cli.spool_session import using_spool
from backupmx.config import Config, load_config, parse_duration
from backupmx.errors import ConfigError
from backupmx.monitor.drill import (
    ACK_TIMEOUT,
    DEFAULT_SETTLE,
    DrillRequest,
    new_drill_id,
    read_report,
    render_report,
    submit_request,
    utc_text,
    wait_report,
)
from backupmx.spool import Spool


def add_parser(subparsers: Any) -> None:
    """Registers `drill` on the CLI's subparsers (`argparse._SubParsersAction`)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "drill",
        help="hold a domain's delivery for a while as if its primary were down, then verify",
        description="Ask the running `backupmx serve` (same --config) to hold delivery for DOMAIN for the given "
        "time as if its primary were down (mail is still accepted), then release it and check that everything "
        "accepted meanwhile was delivered. --report shows the last drill of each domain.",
    )
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the backupmx TOML file")
    p.add_argument("domain", nargs="?", metavar="DOMAIN")
    p.add_argument("--for", dest="window", metavar="DURATION", help="how long to hold, e.g. 10m (at least 1s)")
    p.add_argument(
        "--settle",
        metavar="DURATION",
        default=f"{DEFAULT_SETTLE:g}s",
        help="after the release, how long to wait for the held mail to be delivered (default 5m)",
    )
    p.add_argument("--wait", action="store_true", help="wait for the drill to finish and print its report")
    p.add_argument("--stop", action="store_true", help="end DOMAIN's running drill now")
    p.add_argument("--report", action="store_true", help="print the last drill (of DOMAIN, or of every domain)")
    p.add_argument("--json", action="store_true", help="JSON instead of text")
    p.set_defaults(handler=drill_command)


def drill_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    domain = args.domain.strip().lower().rstrip(".") if args.domain else None
    if domain is not None and cfg.domain(domain) is None:
        raise ConfigError(f"drill: {domain} is not one of the [[domains]] in {cfg.source}")
    if args.report:
        return asyncio.run(using_spool(cfg, lambda spool: _cmd_report(spool, cfg, domain, as_json=args.json)))
    if domain is None:
        raise ConfigError("drill: give a DOMAIN (or --report)")
    if args.stop:
        req = DrillRequest(new_drill_id(), domain, cfg.server.node, "stop", requested_at=time.time())
        return asyncio.run(using_spool(cfg, lambda spool: _cmd_request(spool, req, wait=False, as_json=args.json)))
    if not args.window:
        raise ConfigError("drill: --for DURATION is needed (e.g. --for 10m)")
    window, settle = _duration("--for", args.window), _duration("--settle", args.settle)
    req = DrillRequest(new_drill_id(), domain, cfg.server.node, "start", window, settle, time.time())
    return asyncio.run(using_spool(cfg, lambda spool: _cmd_request(spool, req, wait=args.wait, as_json=args.json)))


def _duration(flag: str, text: str) -> float:
    try:
        seconds = parse_duration(text).total_seconds()
    except ValueError as e:
        raise ConfigError(f"drill: {flag}: {e}") from None
    if seconds < 1:
        raise ConfigError(f"drill: {flag}: must be at least 1s")
    return seconds


async def _cmd_request(spool: Spool, req: DrillRequest, *, wait: bool, as_json: bool) -> int:
    ack, taken = await submit_request(spool, req)
    if not taken:
        print(
            f"backupmx drill: no `backupmx serve` with node name {req.node} took the request within "
            f"{ACK_TIMEOUT:g}s: is it running with this configuration?",
            file=sys.stderr,
        )
        return EXIT_FAIL
    if ack is None or not ack.get("accepted"):
        why = ack.get("detail") if ack else "serve took the request but did not answer"
        print(f"backupmx drill: refused: {why}", file=sys.stderr)
        return EXIT_FAIL
    if req.action == "stop" or not wait:
        if as_json:
            print(json.dumps(ack, indent=1))
        else:
            print(ack.get("detail", "ok"))
            if req.action == "start":
                print(
                    f"delivery for {req.domain} is held until {utc_text(req.requested_at + req.window)}; "
                    f"then `backupmx drill --report {req.domain}`"
                )
        return EXIT_OK
    report = await wait_report(spool, req)
    if report is None:
        print(f"backupmx drill: no report for drill {req.id} yet; see `backupmx drill --report`", file=sys.stderr)
        return EXIT_FAIL
    print(json.dumps(report.to_json(), indent=1) if as_json else render_report(report), end="" if not as_json else "\n")
    return EXIT_OK if report.ok else EXIT_FAIL


async def _cmd_report(spool: Spool, cfg: Config, domain: str | None, *, as_json: bool) -> int:
    names = [domain] if domain else [d.name for d in cfg.domains]
    reports = {n: await read_report(spool, n) for n in names}
    if as_json:
        print(json.dumps({"drills": {n: r.to_json() if r else None for n, r in reports.items()}}, indent=1))
        return EXIT_OK
    for n, r in reports.items():
        print(render_report(r) if r else f"{n}: no drill yet (`backupmx drill {n} --for 10m`)\n", end="")
    return EXIT_OK
