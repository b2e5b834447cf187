"""One accept cell against a real `backupmx serve`: start it, send `--messages` messages of `--size`
KiB with smtp-source over `--sessions` sessions, check the queue holds them all, print msg/s, stop.
For paired whole-process comparisons of spool changes (time it from outside, e.g. /usr/bin/time -v):

    .venv/bin/python bench/accept_cell.py --size 100 --sessions 10 --messages 300
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` and `tests.support` importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from bench.backupmx_node import BackupmxNode
from tests.support.ports import free_port
from tests.support.postfix import smtp_source


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=float, default=100.0, help="KiB per message")
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--messages", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="accept-cell-") as tmp:
        # the primary is a loopback port where nothing listens: everything stays queued
        # [dns] on a loopback port where nothing listens: no lookup leaves the machine
        node = BackupmxNode(
            Path(tmp),
            domains={"example.test": free_port()},
            extra={"dns": {"nameservers": [f"127.0.0.1:{free_port()}"]}},
        )
        with node:
            node.start()
            res = smtp_source(
                node.host, node.port, messages=args.messages, sessions=args.sessions, size_kb=args.size, timeout=600
            )
            count = node.wait_queue_count(args.messages, timeout=60)
            if count != args.messages or res.timed_out:
                print(f"INVALID: queued {count} of {args.messages}", file=sys.stderr)
                return 1
            print(f"{args.messages / res.elapsed:.1f} msg/s  ({args.size} KiB x c{args.sessions})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
