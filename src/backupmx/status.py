"""`backupmx status`: one screen for the operator. Per protected domain: the primary's state and since when,
the mail waiting for it (messages, held recipients, the oldest one's age), the last canary and the last drill.

It reads the spool (queue counts, declared outages, the canary's and the drill's records in the kv) and, when
`serve` runs with its admin listener, the live state from the admin API (`/api/domains`, `/api/alerts`, with the
token of `[admin] token_file` or `data_dir/admin.token`). Without `serve` the primary's state comes from the
outages declared in the spool: "down" while one is open, "unknown" otherwise. It never changes anything.
Exit 0, or 2 for a bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from backupmx.clock import format_span
from backupmx.config import Config, DomainConfig, load_config
from backupmx.monitor.canary import CanaryOutcome, CanaryStatus, read_status
from backupmx.monitor.drill import DrillReport, read_report, utc_text
from backupmx.recipients_cli import ldap_summary
from backupmx.spool import Spool

API_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class Live:
    """What the running node said through its admin API."""

    url: str
    domains: dict[str, dict[str, Any]]  # domain -> /api/domains entry
    alerts: list[dict[str, Any]]


def add_status_parser(subparsers: Any) -> None:
    """Registers `status` on the CLI's subparsers (`argparse._SubParsersAction`)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "status", help="one screen: each domain's primary, waiting mail, last canary, last drill",
        description="Per protected domain: the primary's state and since when, the mail held for it and the "
        "oldest one's age, the last canary and the last drill. Reads the spool, and the running serve's "
        "admin API for the live state when it answers.")
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the backupmx TOML file")
    p.add_argument("--json", action="store_true", help="one JSON document instead of text")
    p.set_defaults(handler=status_command)


def status_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    doc = asyncio.run(collect(cfg))
    sys.stdout.write(json.dumps(doc, indent=1) + "\n" if args.json else render(doc))
    return 0


async def collect(cfg: Config) -> dict[str, Any]:
    from backupmx.service import open_spool

    live_task = asyncio.create_task(fetch_live(cfg))
    spool = await open_spool(cfg)
    try:
        return await gather(cfg, spool, await live_task)
    finally:
        await spool.close()


async def fetch_live(cfg: Config) -> Live | str:
    """The running node's view through its admin API, or why there is none."""
    if not cfg.admin.listen:
        return "the admin listener is off (admin.listen is empty)"
    try:
        from backupmx.admin.auth import GENERATED_TOKEN_FILE, listen_address, load_token
    except ImportError:
        return "this backupmx has no admin listener"
    try:
        host, port = listen_address(cfg)
        if cfg.admin.token_file is None and not (cfg.server.data_dir / GENERATED_TOKEN_FILE).exists():
            return "serve has not run here yet (no admin token)"
        token = load_token(cfg)
    except Exception as e:
        return f"admin token: {e}"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=API_TIMEOUT),
                                         headers=headers) as session:
            async with session.get(f"{url}/api/domains") as resp:
                if resp.status != 200:
                    return f"{url} answered {resp.status}"
                domains = await resp.json()
            async with session.get(f"{url}/api/alerts") as resp:
                alerts = (await resp.json()).get("alerts", []) if resp.status == 200 else []
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
        return f"serve does not answer at {url} ({type(e).__name__})"
    return Live(url, {d["domain"]: d for d in domains.get("domains", [])}, list(alerts))


async def gather(cfg: Config, spool: Spool, live: Live | str) -> dict[str, Any]:
    now = time.time()
    stats = await spool.stats()
    by_domain = {d.domain: d for d in stats.domains}
    open_outages = {o.domain: o.started_at for o in await spool.outages() if o.ended_at is None}
    node = cfg.server.node
    domains: list[dict[str, Any]] = []
    for dc in cfg.domains:
        name = dc.name
        ds = by_domain.get(name)
        entry = live.domains.get(name) if isinstance(live, Live) else None
        if entry is not None:
            p = entry["primary"]
            primary = {"state": p["state"], "since": _iso(_parse(p["since"])),
                       "outage_since": _iso(_parse(entry["outage"]["since"])),
                       "last_error": p.get("last_error"), "source": "serve"}
        elif name in open_outages:
            primary = {"state": "down", "since": _iso(open_outages[name]), "outage_since": _iso(open_outages[name]),
                       "last_error": None, "source": "spool"}
        else:
            primary = {"state": "unknown", "since": None, "outage_since": None, "last_error": None,
                       "source": "spool"}
        oldest = ds.oldest_pending_at if ds else None
        canary = await read_status(spool, node, name)
        drill = await read_report(spool, name)
        domains.append({
            "domain": name,
            "primary": primary,
            "waiting": {"messages": ds.messages_pending if ds else 0,
                        "recipients_queued": ds.by_state.get("queued", 0) if ds else 0,
                        "recipients_held": ds.by_state.get("held", 0) if ds else 0,
                        "oldest_at": _iso(oldest),
                        "oldest_age_seconds": None if oldest is None else round(now - oldest)},
            "canary": _canary_json(canary, configured=any(c.domain == name for c in cfg.canary)),
            "ldap": await _ldap_json(spool, dc),
            "drill": drill.to_json() if drill else None,
            "alerts": [a for a in live.alerts if a.get("domain") == name] if isinstance(live, Live) else [],
        })
    return {
        "node": node, "at": _iso(now),
        "serve": {"reachable": isinstance(live, Live), "admin": live.url if isinstance(live, Live) else None,
                  "note": None if isinstance(live, Live) else live},
        "spool": {"messages_pending": stats.messages_pending, "corrupt": stats.corrupt},
        "domains": domains,
    }


async def _ldap_json(spool: Spool, dc: DomainConfig) -> dict[str, Any] | None:
    """recipients = "ldap://...": the last sync as recorded in the kv (policy/ldap.py); None otherwise."""
    if dc.ldap_url is None:
        return None
    from backupmx.policy.ldap import read_state

    st = await read_state(spool, dc.name)
    return {"url": dc.ldap_url, "count": st.count, "synced_at": _iso(st.synced_at),
            "attempted_at": _iso(st.attempted_at), "error": st.error or None}


def _canary_json(st: CanaryStatus | None, *, configured: bool) -> dict[str, Any] | None:
    if st is None:
        return {"configured": configured, "last": None, "broken": False} if configured else None
    doc = st.to_json()
    doc["configured"] = configured
    doc["broken"] = st.broken
    return doc


# --- text ----------------------------------------------------------------------------------------
def render(doc: dict[str, Any]) -> str:
    serve = doc["serve"]
    where = f"serve answers at {serve['admin']}" if serve["reachable"] else f"serve: {serve['note']}"
    spool = doc["spool"]
    lines = [f"backupmx status of {doc['node']} at {doc['at']}; {where}",
             f"spool: {spool['messages_pending']} message(s) waiting"
             + (f", {spool['corrupt']} set aside as damaged" if spool["corrupt"] else "")]
    now = _parse(doc["at"]) or time.time()
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
            lines.append(f"  recipients  {ldap_summary(d['ldap'])}")
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
    when = f"{_iso(at)} ({format_span(now - at, minute_seconds=True)} ago)"
    outcome = CanaryOutcome(last["outcome"])
    if outcome is CanaryOutcome.DELIVERED:
        text = f"delivered in {last['latency']:.2f}s at {when}: {last.get('reply') or ''}".rstrip(": ")
    elif outcome is CanaryOutcome.FAILED:
        text = f"FAILED at {when}: {last.get('detail')}" + (f": {last['reply']}" if last.get("reply") else "")
    else:
        text = f"inconclusive at {when}: {last.get('detail')}"
    if c.get("broken"):
        text += f"\n              BACKUP PATH BROKEN since {_iso(c['broken_since'])}"
    return text


def _drill_text(r: dict[str, Any] | None) -> str:
    if r is None:
        return "none yet (`backupmx drill DOMAIN --for 10m`)"
    rep = DrillReport.from_json(r)
    verdict = "ok" if rep.ok else rep.state.value if rep.state.value != "done" else "NOT OK"
    text = (f"{_iso(rep.started_at)}, {rep.window:g}s: {verdict}; {rep.accepted} accepted, {rep.delivered} delivered, "
            f"{rep.held} held, {rep.bounced} bounced")
    if rep.state.value == "done" and rep.accepted == 0:
        text += " (no sender used the backup during the window)"
    return text


def _iso(t: float | None) -> str | None:
    return None if t is None else utc_text(t)


def _parse(text: str | None) -> float | None:
    if not text:
        return None
    for fmt in ("%Y-%m-%d %H:%M:%SZ", "%Y-%m-%dT%H:%M:%S%z"):
        try:
            dt = datetime.strptime(text, fmt)
        except ValueError:
            continue
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    return None


def _ago(now: float, text: str) -> str:
    t = _parse(text)
    return "?" if t is None else format_span(now - t, minute_seconds=True)


__all__ = ["add_status_parser", "collect", "render", "status_command"]
