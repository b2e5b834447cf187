"""`backupmx queue list|show|count|flush|hold|release|delete|export`: see and act on held mail, like
Postfix's mailq and postsuper.

Every command opens the spool itself (SQLite allows a second process beside `serve`), does one thing and
exits; the spool (spool/) and the exporter (continuity/export.py) do the work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backupmx.cli.access import require_domain
from backupmx.cli.exits import EXIT_FAIL, EXIT_OK
from backupmx.cli.spool_session import config_arg, with_spool
from backupmx.clock import format_span, iso_time
from backupmx.config import Config
from backupmx.errors import ConfigError
from backupmx.model import MessageRecord, QueueId, RecipientState
from backupmx.spool import QueueFilter, Spool


def add_parser(sub: Any) -> None:
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
    for name, fn, helptext in (
        ("hold", cmd_queue_hold, "hold a message (or --all): no delivery until released"),
        ("release", cmd_queue_release, "release a held message (or --all)"),
    ):
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
    p = qsub.add_parser("export", help="write held mail out as mbox, Maildir or .eml files, one mailbox per recipient")
    config_arg(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--recipient", metavar="ADDRESS")
    who.add_argument("--domain")
    p.add_argument("--format", required=True, choices=["mbox", "maildir", "eml"])
    p.add_argument("--all", action="store_true", help="also messages already delivered but still stored")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(handler=with_spool(cmd_export))


# --- queue ---------------------------------------------------------------------------------------
def _ts(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%a %b %d %H:%M:%S")


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
    flt = QueueFilter(
        domain=args.domain,
        recipient=args.recipient,
        sender=args.sender,
        state=RecipientState(args.state) if args.state else None,
        pending_only=not args.all,
    )
    if args.json:
        msgs = await _all_messages(spool, flt, args.limit)
        print(json.dumps({"messages": [m.to_json() for m in msgs], "count": len(msgs)}, indent=1))
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
                if r.state is RecipientState.HELD:  # how long: held mail is reviewed, never forgotten
                    age = format_span(time.time() - r.updated_at)
                    note = f"held by {r.held_reason or 'operator'} for {age}: {note}".rstrip(": ")
                elif r.state is not RecipientState.QUEUED:
                    note = f"{r.state.value}{' by ' + r.held_reason if r.held_reason else ''}: {note}".rstrip(": ")
                elif not note and r.domain in down_since:
                    note = f"held: primary of {r.domain} down since {iso_time(down_since[r.domain])}"
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
        doc = m.to_json()
        doc["headers"] = head.decode("utf-8", "replace")
        doc["envelope"] = m.envelope.to_json()
        print(json.dumps(doc, indent=1))
        return EXIT_OK
    print(f"Queue ID:   {m.id}")
    print(f"Arrival:    {iso_time(m.received_at)}")
    print(f"Size:       {m.size}")
    print(f"Sender:     <{m.envelope.sender}>")
    print(f"Client:     {m.envelope.client_ip} ({m.envelope.client_helo})")
    if m.envelope.envid or m.envelope.ret:
        print(f"DSN:        RET={m.envelope.ret or '-'} ENVID={m.envelope.envid or '-'}")
    print("Recipients:")
    for r in m.recipients:
        line = f"  {r.address:40s} {r.state.value:9s} attempts={r.attempts}"
        if r.state is RecipientState.QUEUED:
            line += f" next={iso_time(r.next_attempt_at)}"
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


async def _hold_or_release(args: argparse.Namespace, spool: Spool, action: str) -> int:
    """`queue hold` and `queue release`: one message (ID) or --all (of --domain), and how many recipients moved."""
    if args.all == bool(args.id):
        raise ConfigError(f"queue {action}: give a queue ID or --all")
    target = None if args.all else QueueId(args.id)
    if target and await spool.get(target) is None:
        print(f"backupmx: queue {action}: no message {target}", file=sys.stderr)
        return EXIT_FAIL
    if action == "hold":
        n = await spool.hold(target, domain=args.domain, now=time.time())
        print(f"held {n} recipient(s)")
    else:
        n = await spool.release_held(target, domain=args.domain, now=time.time())
        print(f"released {n} recipient(s)")
    return EXIT_OK


async def cmd_queue_hold(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    return await _hold_or_release(args, spool, "hold")


async def cmd_queue_release(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    return await _hold_or_release(args, spool, "release")


async def cmd_queue_delete(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    if not await spool.delete(QueueId(args.id)):
        print(f"backupmx: queue delete: no message {args.id}", file=sys.stderr)
        return EXIT_FAIL
    print(f"deleted {args.id}")
    return EXIT_OK


async def cmd_export(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    from backupmx.continuity.export import Format, Progress, Selection, count, export

    if args.domain:
        sel = Selection(domain=require_domain(cfg, args.domain), include_delivered=args.all)
    else:
        sel = Selection(recipient=args.recipient.strip().lower(), include_delivered=args.all)
    progress = None
    if not args.quiet:
        progress = Progress(await count(spool, sel))
    result = await export(spool, sel, Format(args.format), Path(args.dir), progress=progress)
    if args.quiet:
        print(f"exported {result.messages} messages ({result.copies} copies) to {args.dir}")
    return EXIT_OK
