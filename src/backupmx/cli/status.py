"""`backupmx status [--json]`: one screen for the operator: per protected domain the primary's state and since
when, the mail waiting for it, the last canary and the last drill. backupmx/status.py gathers it (spool, and the
running serve's admin API when it answers); this module prints it. Exit 0, or 2 for a bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from backupmx.clock import format_span
from backupmx.config import load_config
from backupmx.monitor.canary import CanaryOutcome
from backupmx.monitor.drill import DrillReport
from backupmx.policy import ldap
from backupmx.status import collect, parse_when, when_text


def add_parser(subparsers: Any) -> None:
    """Registers `status` on the CLI's subparsers (`argparse._SubParsersAction`)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="one screen: each domain's primary, waiting mail, last canary, last drill",
        description="Per protected domain: the primary's state and since when, the mail held for it and the "
        "oldest one's age, the last canary and the last drill. Reads the spool, and the running serve's "
        "admin API for the live state when it answers.",
    )
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the backupmx TOML file")
    p.add_argument("--json", action="store_true", help="one JSON document instead of text")
    p.set_defaults(handler=status_command)


def status_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    doc = asyncio.run(collect(cfg))
    sys.stdout.write(json.dumps(doc, indent=1) + "\n" if args.json else render(doc))
    return 0


# --- text ----------------------------------------------------------------------------------------
def render(doc: dict[str, Any]) -> str:
    serve = doc["serve"]
    where = f"serve answers at {serve['admin']}" if serve["reachable"] else f"serve: {serve['note']}"
    spool = doc["spool"]
    lines = [
        f"backupmx status of {doc['node']} at {doc['at']}; {where}",
        f"spool: {spool['messages_pending']} message(s) waiting"
        + (f", {spool['corrupt']} set aside as damaged" if spool["corrupt"] else ""),
    ]
    now = parse_when(doc["at"]) or time.time()
    for d in doc["domains"]:
        lines += ["", d["domain"]]
        p = d["primary"]
        since = f" since {p['since']} ({_ago(now, p['since'])})" if p["since"] else ""
        err = f": {p['last_error']}" if p.get("last_error") else ""
        src = "" if p["source"] == "serve" else " (from the spool's declared outages)"
        lines.append(f"  primary     {p['state']}{since}{err}{src}")
        w = d["waiting"]
        held = f", {w['recipients_held']} recipient(s) held" if w["recipients_held"] else ""
        age = w["oldest_age_seconds"]
        oldest = f", oldest {format_span(age, minute_seconds=True)}" if age is not None else ""
        lines.append(f"  waiting     {w['messages']} message(s){held}{oldest}")
        lines.append(f"  canary      {_canary_text(d['canary'], now)}")
        if d.get("ldap"):
            lines.append(f"  recipients  {ldap.summary(d['ldap'])}")
        lines.append(f"  last drill  {_drill_text(d['drill'])}")
        for a in d["alerts"]:
            lines.append(f"  ALERT       {a.get('summary')} (since {a.get('since')})")
    return "\n".join(lines) + "\n"


def _canary_text(c: dict[str, Any] | None, now: float) -> str:
    if c is None:
        return "off (no [[canary]] for this domain)"
    last = c.get("last")
    if last is None:
        return "on, none judged yet"
    at = last["finished_at"]
    when = f"{when_text(at)} ({format_span(now - at, minute_seconds=True)} ago)"
    outcome = CanaryOutcome(last["outcome"])
    if outcome is CanaryOutcome.DELIVERED:
        text = f"delivered in {last['latency']:.2f}s at {when}: {last.get('reply') or ''}".rstrip(": ")
    elif outcome is CanaryOutcome.FAILED:
        text = f"FAILED at {when}: {last.get('detail')}" + (f": {last['reply']}" if last.get("reply") else "")
    else:
        text = f"inconclusive at {when}: {last.get('detail')}"
    if c.get("broken"):
        text += f"\n              BACKUP PATH BROKEN since {when_text(c['broken_since'])}"
    return text


def _drill_text(r: dict[str, Any] | None) -> str:
    if r is None:
        return "none yet (`backupmx drill DOMAIN --for 10m`)"
    rep = DrillReport.from_json(r)
    verdict = "ok" if rep.ok else rep.state.value if rep.state.value != "done" else "NOT OK"
    text = (
        f"{when_text(rep.started_at)}, {rep.window:g}s: {verdict}; {rep.accepted} accepted, "
        f"{rep.delivered} delivered, {rep.held} held, {rep.bounced} bounced"
    )
    if rep.state.value == "done" and rep.accepted == 0:
        text += " (no sender used the backup during the window)"
    return text


def _ago(now: float, text: str) -> str:
    t = parse_when(text)
    return "?" if t is None else format_span(now - t, minute_seconds=True)


__all__ = ["add_parser", "render", "status_command"]
