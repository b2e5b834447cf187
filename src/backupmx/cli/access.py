"""`backupmx access` and `backupmx continuity`: the operator's hand on the emergency inbox (continuity/ does
the work: grants, tokens, the gate, the audit log).

  backupmx access grant ADDRESS [--expires 7d] [--notify OTHER]   a grant and a one-time sign-in link
  backupmx access grant --domain DOMAIN [--csv FILE]              every held recipient's link, as CSV
  backupmx access link ADDRESS [--notify OTHER]                   a new link under the existing grant
  backupmx access revoke ADDRESS | --domain DOMAIN                ends links and sessions at once
  backupmx access list | audit
  backupmx continuity open|close|auto DOMAIN, continuity status   the operator's hand on the gate

Each opens the spool itself (beside a running `serve`, which sees the grants at once), does one thing
and exits; errors are one line on stderr (exit 2 for usage, 1 for a failed action). Nothing here needs
or stores a password of the primary.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from backupmx.cli.exits import EXIT_FAIL, EXIT_OK
from backupmx.cli.spool_session import config_arg, with_spool
from backupmx.clock import iso_time
from backupmx.config import Config, load_config, parse_duration
from backupmx.errors import ConfigError
from backupmx.spool import Spool


def add_parser(sub: Any) -> None:
    """`access` and `continuity`."""
    access = sub.add_parser("access", help="who may read held mail in the emergency inbox")
    asub = access.add_subparsers(dest="access_command", metavar="ACTION")
    p = asub.add_parser("grant", help="grant access and print a one-time sign-in link")
    config_arg(p)
    p.add_argument("address", nargs="?", help="the recipient, e.g. alice@example.com")
    p.add_argument("--domain", help="grant every recipient of DOMAIN; prints a CSV of links")
    p.add_argument("--expires", default=None, help="how long access lasts (default [continuity] grant_default)")
    p.add_argument(
        "--notify",
        metavar="ADDRESS",
        help="also mail the link to this alternate address through [continuity] smarthost",
    )
    p.add_argument("--csv", metavar="FILE", help="with --domain: write the links here (default: stdout)")
    p.set_defaults(handler=with_spool(cmd_grant))
    p = asub.add_parser("link", help="a new one-time sign-in link under an existing grant")
    config_arg(p)
    p.add_argument("address")
    p.add_argument("--notify", metavar="ADDRESS")
    p.set_defaults(handler=with_spool(cmd_link))
    p = asub.add_parser("revoke", help="withdraw a grant: its links and sessions stop working at once")
    config_arg(p)
    p.add_argument("address", nargs="?")
    p.add_argument("--domain")
    p.set_defaults(handler=with_spool(cmd_revoke))
    p = asub.add_parser("list", help="the grants in force")
    config_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=with_spool(cmd_list))
    p = asub.add_parser("audit", help="grants, sign-ins and views, from this node's audit log")
    config_arg(p)
    p.add_argument("--since", default=None, help="only this recent, e.g. 24h (default: all)")
    p.add_argument("--address", help="only this address (or @domain)")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.set_defaults(handler=cmd_audit)

    cont = sub.add_parser("continuity", help="open or close the emergency inbox by hand")
    csub = cont.add_subparsers(dest="continuity_command", metavar="ACTION")
    for name, helptext in (
        ("open", "open DOMAIN's inbox now, outage or not"),
        ("close", "close DOMAIN's inbox, even during an outage"),
        ("auto", "back to the default: open while an outage is declared"),
    ):
        p = csub.add_parser(name, help=helptext)
        config_arg(p)
        p.add_argument("domain")
        p.set_defaults(handler=with_spool(cmd_gate), mode={"close": "closed"}.get(name, name))
    p = csub.add_parser("status", help="each domain's inbox: open or closed, and why")
    config_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=with_spool(cmd_status))


# --- helpers ---------------------------------------------------------------------------------------
def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


def _parts(cfg: Config, spool: Spool) -> tuple[Any, Any, Any]:
    """(AccessStore, AuditLog, Signer) for this installation."""
    from backupmx.clock import SystemClock
    from backupmx.continuity.audit import AUDIT_FILE, AuditLog
    from backupmx.continuity.grants import AccessStore
    from backupmx.continuity.tokens import SECRET_FILE, Signer, load_secret

    c = cfg.continuity
    signer = Signer(load_secret(c.secret_file or cfg.server.data_dir / SECRET_FILE))
    audit = AuditLog(c.audit_log or cfg.server.data_dir / AUDIT_FILE, node=cfg.server.node)
    return AccessStore(spool, signer, SystemClock()), audit, signer


def _warn_disabled(cfg: Config) -> None:
    if not cfg.continuity.enabled:
        print(f"backupmx: warning: [continuity] is not enabled in {cfg.source}: links work once it is", file=sys.stderr)


def require_domain(cfg: Config, domain: str) -> str:
    d = domain.strip().lower().lstrip("@")
    if d not in cfg.domain_names:
        raise ConfigError(f"{d} is not a protected domain of {cfg.source}")
    return d


def _expiry(cfg: Config, value: str | None) -> float:
    c = cfg.continuity
    try:
        span = parse_duration(value) if value else c.grant_default
    except ValueError as e:
        raise ConfigError(f"--expires: {e}") from None
    if span.total_seconds() < 1:
        raise ConfigError("--expires: must be at least 1s")
    if span > c.grant_max:
        raise ConfigError(f"--expires: longer than [continuity] grant_max ({c.grant_max})")
    return time.time() + span.total_seconds()


def sign_in_url(cfg: Config, token: str) -> str:
    return f"{cfg.continuity.public_url}/signin?t={token}"


async def _notify(cfg: Config, audit: Any, to: str, link: Any) -> None:
    from backupmx.continuity.notify import link_notice, send_notice

    msg = link_notice(
        cfg, to=to, address=link.address, link=sign_in_url(cfg, link.token), link_expires_at=link.expires_at
    )
    await send_notice(cfg, msg)
    audit.write(time.time(), "notify", actor=_actor(), address=link.address, to=to, smarthost=cfg.continuity.smarthost)
    print(f"sent the link for {link.address} to {to} through {cfg.continuity.smarthost}")


# --- access ----------------------------------------------------------------------------------------
async def cmd_grant(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    from backupmx.continuity.grants import held_recipients, subject_of
    from backupmx.continuity.notify import check_notify_target

    if bool(args.address) == bool(args.domain):
        raise ConfigError("access grant: give an ADDRESS or --domain DOMAIN")
    if args.domain and args.notify:
        raise ConfigError("access grant: --notify goes with one ADDRESS, not --domain")
    if args.csv and not args.domain:
        raise ConfigError("access grant: --csv goes with --domain")
    _warn_disabled(cfg)
    store, audit, _ = _parts(cfg, spool)
    expires_at = _expiry(cfg, args.expires)
    ttl = cfg.continuity.link_ttl.total_seconds()
    if args.address:
        subject = subject_of(args.address)
        require_domain(cfg, subject.rpartition("@")[2])
        notify_to = check_notify_target(cfg, args.notify) if args.notify else None
        g = await store.grant(subject, expires_at=expires_at, by=_actor())
        link = await store.issue_link(subject, ttl=ttl)
        audit.write(time.time(), "grant", actor=_actor(), address=subject, until=int(g.expires_at))
        audit.write(time.time(), "link", actor=_actor(), address=subject, until=int(link.expires_at))
        print(f"access for {subject} until {iso_time(g.expires_at)}")
        print(f"one-time sign-in link (until {iso_time(link.expires_at)}):")
        print(sign_in_url(cfg, link.token))
        if notify_to:
            await _notify(cfg, audit, notify_to, link)
        return EXIT_OK
    domain = require_domain(cfg, args.domain)
    g = await store.grant(subject_of(domain, domain=True), expires_at=expires_at, by=_actor())
    audit.write(time.time(), "grant", actor=_actor(), address=g.subject, domain=domain, until=int(g.expires_at))
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["address", "link", "link_expires_at", "access_expires_at", "held_messages"])
    addresses = await held_recipients(spool, domain)
    for addr, n in sorted(addresses.items()):
        link = await store.issue_link(addr, ttl=ttl)
        audit.write(time.time(), "link", actor=_actor(), address=addr, until=int(link.expires_at), bulk=True)
        w.writerow([addr, sign_in_url(cfg, link.token), iso_time(link.expires_at), iso_time(g.expires_at), n])
    if args.csv:
        path = Path(args.csv)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the links are keys: not world-readable
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(out.getvalue())
        print(
            f"access for every recipient of {domain} until {iso_time(g.expires_at)}; "
            f"{len(addresses)} link(s) written to {path}"
        )
    else:
        sys.stdout.write(out.getvalue())
    return EXIT_OK


async def cmd_link(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    from backupmx.continuity.grants import subject_of
    from backupmx.continuity.notify import check_notify_target

    _warn_disabled(cfg)
    store, audit, _ = _parts(cfg, spool)
    subject = subject_of(args.address)
    notify_to = check_notify_target(cfg, args.notify) if args.notify else None
    link = await store.issue_link(subject, ttl=cfg.continuity.link_ttl.total_seconds())
    audit.write(time.time(), "link", actor=_actor(), address=subject, until=int(link.expires_at))
    print(f"one-time sign-in link for {subject} (until {iso_time(link.expires_at)}):")
    print(sign_in_url(cfg, link.token))
    if notify_to:
        await _notify(cfg, audit, notify_to, link)
    return EXIT_OK


async def cmd_revoke(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    from backupmx.continuity.grants import subject_of

    if bool(args.address) == bool(args.domain):
        raise ConfigError("access revoke: give an ADDRESS or --domain DOMAIN")
    store, audit, _ = _parts(cfg, spool)
    subject = subject_of(args.domain, domain=True) if args.domain else subject_of(args.address)
    if not await store.revoke(subject):
        print(f"backupmx: access revoke: {subject} has no grant", file=sys.stderr)
        return EXIT_FAIL
    audit.write(time.time(), "revoke", actor=_actor(), address=subject)
    print(f"revoked {subject}: its links and sessions no longer work")
    if not subject.startswith("@"):
        domain_grant = await store.get_grant("@" + subject.rpartition("@")[2])
        if domain_grant is not None:
            print(
                f"note: {domain_grant.subject} still has a domain grant, which covers {subject}; "
                f"revoke it with --domain",
                file=sys.stderr,
            )
    return EXIT_OK


async def cmd_list(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    store, _, _ = _parts(cfg, spool)
    grants = await store.grants()
    if args.json:
        print(
            json.dumps(
                {
                    "grants": [
                        {
                            "subject": g.subject,
                            "domain": g.domain,
                            "created_at": iso_time(g.created_at),
                            "expires_at": iso_time(g.expires_at),
                            "by": g.by,
                        }
                        for g in grants
                    ]
                },
                indent=1,
            )
        )
        return EXIT_OK
    if not grants:
        print("no access grants")
        return EXIT_OK
    print(f"{'SUBJECT':40s} {'EXPIRES':25s} {'GRANTED':25s} BY")
    for g in grants:
        label = f"{g.subject} (every recipient)" if g.is_domain else g.subject
        print(f"{label:40s} {iso_time(g.expires_at):25s} {iso_time(g.created_at):25s} {g.by}")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from backupmx.continuity.audit import AUDIT_FILE, AuditLog

    cfg = load_config(args.config)
    since = 0.0
    if args.since:
        try:
            since = time.time() - parse_duration(args.since).total_seconds()
        except ValueError as e:
            raise ConfigError(f"--since: {e}") from None
    log = AuditLog(cfg.continuity.audit_log or cfg.server.data_dir / AUDIT_FILE)
    n = 0
    for ev in log.read(since=since, address=args.address):
        n += 1
        if args.json:
            print(ev.to_line())
            continue
        extra = " ".join(f"{k}={v}" for k, v in ev.fields.items() if k != "node")
        print(f"{iso_time(ev.at)}  {ev.event:15s} {ev.address or '-':35s} {ev.actor:18s} {extra}".rstrip())
    if n == 0 and not args.json:
        print("no audit events", file=sys.stderr)
    return EXIT_OK


# --- the gate --------------------------------------------------------------------------------------
def _gate(cfg: Config, spool: Spool) -> Any:
    from backupmx.clock import SystemClock
    from backupmx.continuity.gate import Gate, SpoolOutages

    return Gate(spool, SpoolOutages(spool), SystemClock(), [d.name for d in cfg.domains], cache_seconds=0)


async def cmd_gate(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    from backupmx.continuity.gate import Mode

    domain = require_domain(cfg, args.domain)
    _warn_disabled(cfg)
    gate = _gate(cfg, spool)
    mode = Mode(args.mode)
    await gate.set_mode(domain, mode, by=_actor())
    _, audit, _ = _parts(cfg, spool)
    audit.write(time.time(), f"inbox-{mode.value}", actor=_actor(), address=None, domain=domain)
    st = await gate.state(domain)
    why = {
        Mode.OPEN: "opened by hand",
        Mode.CLOSED: "closed by hand",
        Mode.AUTO: "an outage is declared" if st.outage_since else "no outage is declared",
    }[mode]
    print(f"{domain}: emergency inbox {'open' if st.open else 'closed'} ({why})")
    return EXIT_OK


async def cmd_status(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    gate = _gate(cfg, spool)
    states = [await gate.state(d.name) for d in cfg.domains]
    if args.json:
        print(
            json.dumps(
                {
                    "enabled": cfg.continuity.enabled,
                    "url": cfg.continuity.public_url,
                    "domains": [
                        {
                            "domain": s.domain,
                            "open": s.open,
                            "mode": s.mode.value,
                            "outage_since": iso_time(s.outage_since) if s.outage_since else None,
                        }
                        for s in states
                    ],
                },
                indent=1,
            )
        )
        return EXIT_OK
    print(f"emergency inbox: {'enabled' if cfg.continuity.enabled else 'NOT enabled'} at {cfg.continuity.public_url}")
    for s in states:
        outage = f"outage since {iso_time(s.outage_since)}" if s.outage_since else "no outage"
        print(f"  {s.domain:30s} {'OPEN' if s.open else 'closed':7s} mode={s.mode.value:7s} {outage}")
    return EXIT_OK
