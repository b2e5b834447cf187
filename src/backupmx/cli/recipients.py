"""`backupmx recipients list|add|remove|import`: see and edit what backupmx knows about recipients.

For `recipients = "verify"` domains this is the learned set in the spool (policy/learned.py): what the
primary answered to RCPT probes, what deliveries taught, and the operator's own entries, which never
expire unless given `--ttl`. `add --unknown` remembers an address as refused (550 5.1.1). Domains with
a list or a `file:` are shown read-only (edit the config or the file; a file is re-read on change or
SIGHUP); `ldap://` domains show their last sync and its addresses (policy/ldap.py), verify domains the
end of a recovery guard still running. The work is policy/'s; this module parses, checks and prints.
Works while `serve` runs (it opens the spool beside it, as `queue` does). Errors are one line on stderr:
exit 2 for usage or configuration, 1 for a failed action.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from backupmx.cli.exits import EXIT_FAIL, EXIT_OK
from backupmx.cli.spool_session import config_arg, with_spool
from backupmx.clock import iso_time
from backupmx.config import Config, DomainConfig, parse_duration
from backupmx.errors import ConfigError
from backupmx.policy import domain_of, ldap
from backupmx.policy.learned import LearnedRecipient, LearnedRecipients, Source
from backupmx.spool import OutagePeriod, Spool

PAGE = 500

Command = Callable[[argparse.Namespace, Config, LearnedRecipients], Awaitable[int]]


def add_parser(sub: Any) -> None:
    rec = sub.add_parser("recipients", help="see and edit the recipients backupmx knows (verify domains)")
    rsub = rec.add_subparsers(dest="recipients_command", metavar="ACTION")

    p = rsub.add_parser("list", help="learned and configured recipients, per domain")
    config_arg(p)
    p.add_argument("domain", nargs="?", help="only this domain")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.set_defaults(handler=with_spool(cmd_list_spool))

    p = rsub.add_parser("add", help="remember addresses of a verify domain as known (or --unknown)")
    config_arg(p)
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p.add_argument("--unknown", action="store_true", help="remember them as refused (550 5.1.1) instead")
    p.add_argument("--ttl", help='forget them after this long ("30d"); default: never')
    p.set_defaults(handler=_run(cmd_add))

    p = rsub.add_parser("remove", help="forget addresses (they are asked of the primary again)")
    config_arg(p)
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p.set_defaults(handler=_run(cmd_remove))

    p = rsub.add_parser("import", help="remember every address of a file (one per line) as known")
    config_arg(p)
    p.add_argument("file", help="one address (or a bare local part, with --domain) per line; # comments")
    p.add_argument("--domain", help="the domain of bare local parts")
    p.add_argument("--ttl", help="forget them after this long; default: never")
    p.set_defaults(handler=_run(cmd_import))


def _run(fn: Command) -> Callable[[argparse.Namespace], int]:
    """with_spool, with the learned-recipients store over the spool instead of the spool."""

    async def over_store(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
        return await fn(args, cfg, LearnedRecipients(spool, keep=cfg.delivery.retention_cap.total_seconds()))

    return with_spool(over_store)


def _mode(d: DomainConfig) -> str:
    if isinstance(d.recipients, tuple):
        return "list"
    if d.ldap_url is not None:
        return "ldap"
    return "file" if d.recipients.startswith("file:") else d.recipients


def _verify_domain(cfg: Config, address: str) -> DomainConfig:
    if "@" not in address or not address.rpartition("@")[0]:
        raise ConfigError(f"{address!r} is not an address (local@domain)")
    domain = domain_of(address)
    d = cfg.domain(domain)
    if d is None:
        raise ConfigError(f"{domain} is not a domain of {cfg.source}")
    if d.recipients != "verify":
        where = d.recipients if isinstance(d.recipients, str) else "the list in the config"
        raise ConfigError(f"{domain} does not learn recipients (recipients = {where}); edit that instead")
    return d


def _normal(address: str) -> str:
    """ "<Dave@V.Test>" -> "Dave@v.test": the domain lower-cased, the local part as given."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    return f"{local}@{domain.lower()}" if at else address


def _expiry(ttl: str | None, now: float) -> float | None:
    if not ttl:
        return None
    try:
        return now + parse_duration(ttl).total_seconds()
    except ValueError as e:
        raise ConfigError(f"--ttl: {e}") from None


def _entry_json(e: LearnedRecipient, now: float) -> dict[str, Any]:
    return {
        "address": e.address,
        "known": e.known,
        "source": e.source,
        "learned_at": iso_time(e.learned_at),
        "expires_at": iso_time(e.expires_at),
        "fresh": e.fresh(now),
    }


async def _all(store: LearnedRecipients, domain: str) -> tuple[list[LearnedRecipient], int]:
    """Every readable entry of the domain, and how many damaged rows were skipped. The paging follows the
    raw rows (LearnedRecipients.page), so a damaged row never ends the listing early."""
    out: list[LearnedRecipient] = []
    damaged = 0
    async for page in store.pages(domain, limit=PAGE):
        out.extend(page.entries)
        damaged += page.damaged
    return out, damaged


async def cmd_list_spool(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    """`recipients list` reads the learned set and the declared outages (for the recovery guard)."""
    store = LearnedRecipients(spool, keep=cfg.delivery.retention_cap.total_seconds())
    return await cmd_list(args, cfg, store, outages=spool.outages)


async def cmd_list(
    args: argparse.Namespace,
    cfg: Config,
    store: LearnedRecipients,
    outages: Callable[[], Awaitable[list[OutagePeriod]]] | None = None,
) -> int:
    domains = list(cfg.domains)
    if args.domain:
        d = cfg.domain(args.domain)
        if d is None:
            raise ConfigError(f"{args.domain} is not a domain of {cfg.source}")
        domains = [d]
    now = time.time()
    doc: dict[str, Any] = {}
    damaged = 0
    for d in domains:
        mode = _mode(d)
        item: dict[str, Any] = {"recipients": mode}
        if mode == "verify":
            learned, skipped = await _all(store, d.name)
            item["learned"] = [_entry_json(e, now) for e in learned]
            item["recovery_guard_until"] = iso_time(await _guard_until(outages, cfg, d.name, now))
            damaged += skipped
        elif mode == "list":
            item["entries"] = list(d.recipients)
        elif mode == "ldap":
            item.update(await ldap.listing(store.kv, d))
        elif mode == "file":
            path = Path(str(d.recipients)[5:])
            item["file"] = str(path)
            try:
                item["entries"] = [
                    ln.split()[0]
                    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
                    if ln.strip() and not ln.strip().startswith("#")
                ]
            except OSError as e:
                item["error"] = f"cannot read: {e.strerror}"
        doc[d.name] = item
    if damaged:
        print(
            f"backupmx: recipients list: {damaged} damaged {'entry' if damaged == 1 else 'entries'} skipped",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps({"domains": doc}, indent=1))
        return EXIT_OK
    for name, item in doc.items():
        mode = item["recipients"]
        if mode == "verify":
            learned = item["learned"]
            print(f"{name}: verify, {len(learned)} learned")
            if item["recovery_guard_until"]:
                print(
                    f"  the primary came back from an outage: until {item['recovery_guard_until']} "
                    "(delivery.recovery_guard) a probe's 5.1.1 is answered 450 4.1.1, not 550"
                )
            for row in learned:
                state = "known  " if row["known"] else "unknown"
                until = row["expires_at"] or "never"
                stale = "" if row["fresh"] else "  (stale: asked again while the primary is up)"
                print(
                    f"  {state} {row['address']:40s} {row['source']:9s} since {row['learned_at']}  until {until}{stale}"
                )
        elif mode == "any":
            print(f"{name}: any (every address is accepted)")
        elif mode == "ldap":
            print(f"{name}: {ldap.summary({**item, 'count': len(item['entries'])})}")
            for entry in item["entries"]:
                print(f"  {entry}")
        elif mode == "list":
            print(f"{name}: list in the config, {len(item['entries'])} entries")
            for entry in item["entries"]:
                print(f"  {entry}")
        else:
            if "error" in item:
                print(f"{name}: file {item['file']}: {item['error']}")
                continue
            print(f"{name}: file {item['file']}, {len(item['entries'])} entries")
            for entry in item["entries"]:
                print(f"  {entry}")
    return EXIT_OK


async def _guard_until(
    outages: Callable[[], Awaitable[list[OutagePeriod]]] | None, cfg: Config, domain: str, now: float
) -> float | None:
    """When the recovery guard after the domain's last outage ends, if that is still ahead (policy/verify.py
    answers a probe's 5.1.1 with 450 until then, since a recovering primary may not see its users yet)."""
    if outages is None:
        return None
    ended = [o.ended_at for o in await outages() if o.domain == domain and o.ended_at is not None]
    if not ended:
        return None
    until = max(ended) + cfg.delivery.recovery_guard.total_seconds()
    return until if until > now else None


async def cmd_add(args: argparse.Namespace, cfg: Config, store: LearnedRecipients) -> int:
    now = time.time()
    expires = _expiry(args.ttl, now)
    addresses = [_normal(a) for a in args.addresses]
    for address in addresses:
        _verify_domain(cfg, address)
    for address in addresses:
        await store.put(LearnedRecipient(address, not args.unknown, Source.OPERATOR, now, expires))
    what = "unknown" if args.unknown else "known"
    print(f"remembered {len(args.addresses)} address(es) as {what}")
    return EXIT_OK


async def cmd_remove(args: argparse.Namespace, cfg: Config, store: LearnedRecipients) -> int:
    removed = 0
    addresses = [_normal(a) for a in args.addresses]
    for address in addresses:
        _verify_domain(cfg, address)
    for address in addresses:
        if await store.delete(address):
            removed += 1
        else:
            print(f"backupmx: recipients remove: {address} was not known", file=sys.stderr)
    print(f"forgot {removed} address(es)")
    return EXIT_OK if removed == len(args.addresses) else EXIT_FAIL


async def cmd_import(args: argparse.Namespace, cfg: Config, store: LearnedRecipients) -> int:
    try:
        text = Path(args.file).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ConfigError(f"{args.file}: cannot read: {e.strerror}") from None
    now = time.time()
    expires = _expiry(args.ttl, now)
    addresses: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word = _normal(line.split()[0])
        if word.startswith("@"):
            print(
                f"backupmx: {args.file}:{lineno}: {word}: wildcards are for recipient files; skipped", file=sys.stderr
            )
            continue
        if "@" not in word:
            if not args.domain:
                raise ConfigError(f"{args.file}:{lineno}: {word!r} has no domain; give --domain")
            word = f"{word}@{args.domain}"
        try:
            _verify_domain(cfg, word)
        except ConfigError as e:
            raise ConfigError(f"{args.file}:{lineno}: {e}") from None
        addresses.append(word)
    for address in addresses:
        await store.put(LearnedRecipient(address, True, Source.IMPORT, now, expires))
    print(f"imported {len(addresses)} address(es)")
    return EXIT_OK


__all__ = ["add_parser"]
