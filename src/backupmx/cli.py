"""The `backupmx` command: serve, config check, queue inspection and actions, and the audits.

Every queue command opens the spool itself (SQLite allows a second process beside `serve`), does one
thing and exits. Errors are one line on stderr and a non-zero exit (2 for usage or configuration,
1 for a failed action), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from backupmx import __version__
from backupmx.config import Config, load_config, require_domains
from backupmx.errors import BackupMXError, ConfigError
from backupmx.model import MessageRecord, QueueId, RecipientState
from backupmx.spool import QueueFilter, Spool
from backupmx.spool_command import config_arg, with_spool

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


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

    serve = sub.add_parser("serve", help="run the SMTP server, delivery and admin listener in the foreground")
    config_arg(serve)
    serve.set_defaults(handler=cmd_serve)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    check = config_sub.add_parser("check", help="validate a configuration file")
    config_arg(check)
    check.set_defaults(handler=cmd_config_check)

    queue = sub.add_parser("queue", help="see and act on held mail")
    qsub = queue.add_subparsers(dest="queue_command", metavar="ACTION")
    q = qsub.add_parser("list", help="list queued messages (like mailq)")
    config_arg(q)
    q.add_argument("--json", action="store_true", help="one JSON document")
    q.add_argument("--domain")
    q.add_argument("--recipient")
    q.add_argument("--sender")
    q.add_argument("--state", choices=[s.value for s in RecipientState])
    q.add_argument("--all", action="store_true", help="include messages already delivered/bounced")
    q.add_argument("--limit", type=int, default=0, help="at most this many messages (0 = all)")
    q.set_defaults(handler=with_spool(cmd_queue_list))
    q = qsub.add_parser("show", help="one message: envelope, headers, per-recipient state")
    config_arg(q)
    q.add_argument("id")
    q.add_argument("--json", action="store_true")
    q.add_argument("--body", action="store_true", help="print the whole stored message")
    q.set_defaults(handler=with_spool(cmd_queue_show))
    q = qsub.add_parser("count", help="print the number of messages not yet delivered/bounced/expired")
    config_arg(q)
    q.set_defaults(handler=with_spool(cmd_queue_count))
    q = qsub.add_parser("flush", help="make queued mail due now (of DOMAIN, or all)")
    config_arg(q)
    q.add_argument("domain", nargs="?")
    q.set_defaults(handler=with_spool(cmd_queue_flush))
    for name, fn, helptext in (("hold", cmd_queue_hold, "hold a message (or --all): no delivery until released"),
                               ("release", cmd_queue_release, "release a held message (or --all)")):
        q = qsub.add_parser(name, help=helptext)
        config_arg(q)
        q.add_argument("id", nargs="?")
        q.add_argument("--all", action="store_true")
        q.add_argument("--domain", help="with --all: only this domain")
        q.set_defaults(handler=with_spool(fn))
    q = qsub.add_parser("delete", help="delete a message (no DSN is sent)")
    config_arg(q)
    q.add_argument("id")
    q.set_defaults(handler=with_spool(cmd_queue_delete))
    _add_queue_export(qsub)

    for hook in _optional_hooks():
        hook(sub)
    return p


# Subcommands that live with their feature: (module, function adding its parser). One line each; a
# feature whose module is missing simply has no subcommand.
SUBCOMMAND_HOOKS: tuple[tuple[str, str], ...] = (
    ("backupmx.monitor.check", "add_check_parser"),
    ("backupmx.spool.cli", "add_spool_parser"),
    ("backupmx.recipients_cli", "add_recipients_parser"),
    ("backupmx.monitor.drill", "add_drill_parser"),
    ("backupmx.status", "add_status_parser"),
    ("backupmx.continuity.cli", "add_parsers"),  # access, continuity
)


def _add_queue_export(qsub: Any) -> None:
    """`queue export` lives with the emergency inbox (backupmx.continuity), registered if present."""
    try:
        from backupmx.continuity.cli import add_queue_export
    except ImportError:
        return
    add_queue_export(qsub)


def _optional_hooks() -> list[Callable[[Any], None]]:
    hooks: list[Callable[[Any], None]] = []
    for module_name, function in SUBCOMMAND_HOOKS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        hooks.append(getattr(module, function))
    return hooks


# --- serve / config ------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from backupmx.service import run_service

    cfg = load_config(args.config)
    return run_service(cfg)


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    require_domains(cfg)
    print(f"{cfg.source}: ok ({len(cfg.domains)} domain(s): {', '.join(d.name for d in cfg.domains)})")
    return EXIT_OK


# --- queue ---------------------------------------------------------------------------------------
def _ts(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%a %b %d %H:%M:%S")


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def message_json(m: MessageRecord) -> dict[str, Any]:
    return {
        "id": m.id,
        "size": m.size,
        "received_at": _iso(m.received_at),
        "sender": m.envelope.sender,
        "kind": m.kind.value,
        "client_ip": m.envelope.client_ip,
        "recipients": [
            {
                "address": r.address,
                "state": r.state.value,
                "attempts": r.attempts,
                "next_attempt_at": _iso(r.next_attempt_at) if r.state is RecipientState.QUEUED else None,
                "last_attempt_at": _iso(r.last_attempt_at),
                "last_reply": r.last_reply,
                "held_reason": r.held_reason,
            }
            for r in m.recipients
        ],
    }


async def _all_messages(spool: Spool, flt: QueueFilter, limit: int) -> list[MessageRecord]:
    out: list[MessageRecord] = []
    after: QueueId | None = None
    while True:
        page = await spool.list_messages(flt, limit=500, after=after)
        out.extend(page)
        if limit and len(out) >= limit:
            return out[:limit]
        if len(page) < 500:
            return out
        after = page[-1].id


async def cmd_queue_list(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    flt = QueueFilter(domain=args.domain, recipient=args.recipient, sender=args.sender,
                      state=RecipientState(args.state) if args.state else None, pending_only=not args.all)
    if args.json:
        msgs = await _all_messages(spool, flt, args.limit)
        print(json.dumps({"messages": [message_json(m) for m in msgs], "count": len(msgs)}, indent=1))
        return EXIT_OK
    # Text: stream page by page so a huge queue prints without holding it in memory.
    # Mail that has had no attempt yet because its primary is down says so, as Postfix shows the
    # reason of the last attempt.
    down_since = {o.domain: o.started_at for o in await spool.outages() if o.ended_at is None}
    print("-Queue ID-      --Size-- ----Arrival Time---- -Sender/Recipient-------")
    total_bytes = count = 0
    after: QueueId | None = None
    while True:
        page = await spool.list_messages(flt, limit=500, after=after)
        for m in page:
            pending = [r for r in m.recipients if not r.state.is_final] or list(m.recipients)
            mark = "!" if pending and all(r.state is RecipientState.HELD for r in pending) else " "
            print(f"{m.id}{mark} {m.size:8d} {_ts(m.received_at):20s}  {m.envelope.sender or 'MAILER-DAEMON'}")
            for r in pending:
                note = r.last_reply or ""
                if r.state is not RecipientState.QUEUED:
                    note = f"{r.state.value}{' by ' + r.held_reason if r.held_reason else ''}: {note}".rstrip(": ")
                elif not note and r.domain in down_since:
                    note = f"held: primary of {r.domain} down since {_iso(down_since[r.domain])}"
                if note:
                    print(f"{'':46s}({note})")
                print(f"{'':46s}{r.address}")
            print()
            total_bytes += m.size
            count += 1
            if args.limit and count >= args.limit:
                break
        if len(page) < 500 or (args.limit and count >= args.limit):
            break
        after = page[-1].id
    if count == 0:
        print("Mail queue is empty")
    else:
        print(f"-- {(total_bytes + 1023) // 1024} Kbytes in {count} Request{'s' if count != 1 else ''}.")
    return EXIT_OK


async def cmd_queue_show(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    m = await spool.get(QueueId(args.id))
    if m is None:
        print(f"backupmx: queue show: no message {args.id}", file=sys.stderr)
        return EXIT_FAIL
    if args.body:
        sys.stdout.buffer.write(await spool.read_body(m.id))
        return EXIT_OK
    body = await spool.read_body(m.id)
    head, _, _ = body.partition(b"\r\n\r\n")
    if args.json:
        doc = message_json(m)
        doc["headers"] = head.decode("utf-8", "replace")
        doc["envelope"] = m.envelope.to_json()
        print(json.dumps(doc, indent=1))
        return EXIT_OK
    print(f"Queue ID:   {m.id}")
    print(f"Arrival:    {_iso(m.received_at)}")
    print(f"Size:       {m.size}")
    print(f"Sender:     <{m.envelope.sender}>")
    print(f"Client:     {m.envelope.client_ip} ({m.envelope.client_helo})")
    if m.envelope.envid or m.envelope.ret:
        print(f"DSN:        RET={m.envelope.ret or '-'} ENVID={m.envelope.envid or '-'}")
    print("Recipients:")
    for r in m.recipients:
        line = f"  {r.address:40s} {r.state.value:9s} attempts={r.attempts}"
        if r.state is RecipientState.QUEUED:
            line += f" next={_iso(r.next_attempt_at)}"
        if r.held_reason:
            line += f" held-by={r.held_reason}"
        print(line)
        if r.last_reply:
            print(f"    last reply: {r.last_reply}")
    print("Headers:")
    print(head.decode("utf-8", "replace").replace("\r\n", "\n"))
    return EXIT_OK


async def cmd_queue_count(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    print(await spool.count_pending())
    return EXIT_OK


async def cmd_queue_flush(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    n = await spool.flush(args.domain, now=time.time())
    print(f"flushed {n} recipient(s)")
    return EXIT_OK


def _target(args: argparse.Namespace, action: str) -> QueueId | None:
    if args.all == bool(args.id):
        raise ConfigError(f"queue {action}: give a queue ID or --all")
    return None if args.all else QueueId(args.id)


async def cmd_queue_hold(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    target = _target(args, "hold")
    if target and await spool.get(target) is None:
        print(f"backupmx: queue hold: no message {target}", file=sys.stderr)
        return EXIT_FAIL
    n = await spool.hold(target, domain=args.domain, now=time.time())
    print(f"held {n} recipient(s)")
    return EXIT_OK


async def cmd_queue_release(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    target = _target(args, "release")
    if target and await spool.get(target) is None:
        print(f"backupmx: queue release: no message {target}", file=sys.stderr)
        return EXIT_FAIL
    n = await spool.release_held(target, domain=args.domain, now=time.time())
    print(f"released {n} recipient(s)")
    return EXIT_OK


async def cmd_queue_delete(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    if not await spool.delete(QueueId(args.id)):
        print(f"backupmx: queue delete: no message {args.id}", file=sys.stderr)
        return EXIT_FAIL
    print(f"deleted {args.id}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
