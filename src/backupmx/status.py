"""What `backupmx status` shows, gathered (cli/status.py prints it). Per protected domain: the primary's state
and since when, the mail waiting for it (messages, held recipients, the oldest one's age), the last canary,
the last drill and, for `recipients = "ldap://..."`, the directory's last sync.

It reads the spool (queue counts, declared outages, the canary's and the drill's records in the kv) and, when
`serve` runs with its admin listener, the live state from the admin API (`/api/domains`, `/api/alerts`, with the
token of `[admin] token_file` or `data_dir/admin.token`). Without `serve` the primary's state comes from the
outages declared in the spool: "down" while one is open, "unknown" otherwise. It never changes anything.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from backupmx.config import Config, DomainConfig
from backupmx.monitor.canary import CanaryStatus, read_status
from backupmx.monitor.drill import read_report, utc_text
from backupmx.policy.ldap import read_state
from backupmx.spool import Spool
from backupmx.spool.backends import open_spool

API_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class Live:
    """What the running node said through its admin API."""

    url: str
    domains: dict[str, dict[str, Any]]  # domain -> /api/domains entry
    alerts: list[dict[str, Any]]


async def collect(cfg: Config) -> dict[str, Any]:
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
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=API_TIMEOUT), headers=headers) as session:
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
            primary = {
                "state": p["state"],
                "since": when_text(parse_when(p["since"])),
                "outage_since": when_text(parse_when(entry["outage"]["since"])),
                "last_error": p.get("last_error"),
                "source": "serve",
            }
        elif name in open_outages:
            down_since = when_text(open_outages[name])
            primary = {
                "state": "down",
                "since": down_since,
                "outage_since": down_since,
                "last_error": None,
                "source": "spool",
            }
        else:
            primary = {"state": "unknown", "since": None, "outage_since": None, "last_error": None, "source": "spool"}
        oldest = ds.oldest_pending_at if ds else None
        canary = await read_status(spool, node, name)
        drill = await read_report(spool, name)
        domains.append(
            {
                "domain": name,
                "primary": primary,
                "waiting": {
                    "messages": ds.messages_pending if ds else 0,
                    "recipients_queued": ds.by_state.get("queued", 0) if ds else 0,
                    "recipients_held": ds.by_state.get("held", 0) if ds else 0,
                    "oldest_at": when_text(oldest),
                    "oldest_age_seconds": None if oldest is None else round(now - oldest),
                },
                "canary": _canary_json(canary, configured=any(c.domain == name for c in cfg.canary)),
                "ldap": await _ldap_json(spool, dc),
                "drill": drill.to_json() if drill else None,
                "alerts": [a for a in live.alerts if a.get("domain") == name] if isinstance(live, Live) else [],
            }
        )
    return {
        "node": node,
        "at": when_text(now),
        "serve": {
            "reachable": isinstance(live, Live),
            "admin": live.url if isinstance(live, Live) else None,
            "note": None if isinstance(live, Live) else live,
        },
        "spool": {"messages_pending": stats.messages_pending, "corrupt": stats.corrupt},
        "domains": domains,
    }


async def _ldap_json(spool: Spool, dc: DomainConfig) -> dict[str, Any] | None:
    """recipients = "ldap://...": the last sync as recorded in the kv (policy/ldap.py); None otherwise."""
    if dc.ldap_url is None:
        return None
    st = await read_state(spool, dc.name)
    return {
        "url": dc.ldap_url,
        "count": st.count,
        "synced_at": when_text(st.synced_at),
        "attempted_at": when_text(st.attempted_at),
        "error": st.error or None,
    }


def _canary_json(st: CanaryStatus | None, *, configured: bool) -> dict[str, Any] | None:
    if st is None:
        return {"configured": configured, "last": None, "broken": False} if configured else None
    doc = st.to_json()
    doc["configured"] = configured
    doc["broken"] = st.broken
    return doc


def when_text(t: float | None) -> str | None:
    """A time as `status` shows it ("2026-11-24 10:15:01Z"), None for none."""
    return None if t is None else utc_text(t)


def parse_when(text: str | None) -> float | None:
    """A time as `status` or the admin API writes it, back to a timestamp; None for none or unreadable."""
    if not text:
        return None
    for fmt in ("%Y-%m-%d %H:%M:%SZ", "%Y-%m-%dT%H:%M:%S%z"):
        try:
            dt = datetime.strptime(text, fmt)
        except ValueError:
            continue
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    return None


__all__ = ["Live", "collect", "fetch_live", "gather", "parse_when", "when_text"]
