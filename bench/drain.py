"""Drain after an outage: N messages are held while the primary is down (nothing listens on its port),
then the primary comes back (smtp-sink starts on that port) and we time until the queue is empty.

Postfix (a backup MX with relay_domains + transport to the primary): `postqueue -f` right when the sink
is up, as an operator would (without it, Postfix waits for each message's retry time, minutes).
backupmx: nothing is done; its health probe (probe_interval 1s here, 30s by default) sees the primary
come back and delivery starts on its own, so its figure includes the detection delay (reported apart).
Same N, same message size, same smtp-sink flags. Every message must reach the sink exactly once
(the sink's count equals N) or the run is reported invalid.

    .venv/bin/python bench/drain.py             # 20,000 x 5 KB
    .venv/bin/python bench/drain.py --quick     # 2,000 x 5 KB
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` and `tests.support` importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from bench.backupmx_node import BackupmxNode, BackupmxUnavailable
from bench.figures import fmt, machine, machine_line, table
from bench.preflight import cannot_run, work_dir
from tests.support.ports import free_port
from tests.support.postfix import (
    PostfixInstance,
    SmtpSink,
    smtp_source,
)

RECIPIENT = "alice@example.test"
LOAD_SESSIONS = 20


@dataclass
class DrainRecord:
    target: str
    messages: int
    load_seconds: float
    first_at_primary: float  # seconds from the sink being up to its first message
    all_at_primary: float  # ... to its N-th message
    queue_empty: float  # ... to the queue being empty (as its own tools report)
    sink_count: int
    valid: bool
    detail: str = ""
    peak_rss_kib: int = 0

    @property
    def rate(self) -> float:
        return self.messages / self.queue_empty if self.queue_empty > 0 else 0.0


def watch_drain(sink: SmtpSink, expected: int, queue_count: Callable[[], int], *, timeout: float,
                queue_poll: float) -> tuple[float, float, float]:
    """From now: (first message at the sink, all `expected` at the sink, queue empty), in seconds;
    NaN for what did not happen within `timeout`."""
    t0 = time.perf_counter()
    first = all_in = empty = float("nan")
    next_queue_poll = 0.0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = time.perf_counter() - t0
        got = sink.messages
        if got > 0 and math.isnan(first):
            first = now
        if got >= expected and math.isnan(all_in):
            all_in = now
        if now >= next_queue_poll:
            if queue_count() == 0:
                empty = time.perf_counter() - t0
                if math.isnan(all_in) and sink.messages >= expected:
                    all_in = empty
                break
            next_queue_poll = (time.perf_counter() - t0) + queue_poll
        time.sleep(0.02)
    return first, all_in, empty


def drain_postfix(n: int, size_kb: float, timeout: float) -> DrainRecord:
    with PostfixInstance("backup", domain="example.test") as pf:
        started = time.perf_counter()
        res = smtp_source(pf.host, pf.port, messages=n, sessions=LOAD_SESSIONS, size_kb=size_kb,
                          recipient=RECIPIENT, timeout=timeout)
        if not res.ok:
            return DrainRecord("postfix", n, 0, 0, 0, 0, 0, False, f"load failed: {res.output[-300:]}")
        counts = pf.wait_settled(n, timeout=timeout)
        load = time.perf_counter() - started
        held = pf.postqueue_count()
        if held != n:
            return DrainRecord("postfix", n, load, 0, 0, 0, 0, False, f"held {held} of {n}: {counts}")
        host, port = pf.relay
        with SmtpSink(host, port) as sink:  # the primary is back where it was
            pf.flush()
            first, all_in, empty = watch_drain(sink, n, pf.queue_count, timeout=timeout, queue_poll=0.05)
            got = sink.wait_messages(n, timeout=5)
        ok = got == n and not math.isnan(empty)
        return DrainRecord("postfix", n, load, first, all_in, empty, got, ok,
                           "" if ok else f"sink got {got} of {n}, queue {pf.queue_count()}")


def drain_backupmx(n: int, size_kb: float, timeout: float, work: Path, probe_interval: str) -> DrainRecord:
    primary_port = free_port()
    node = BackupmxNode(work / "drain", domains={"example.test": primary_port},
                        delivery={"probe_interval": probe_interval})
    with node:
        node.start()
        started = time.perf_counter()
        res = smtp_source(node.host, node.port, messages=n, sessions=LOAD_SESSIONS, size_kb=size_kb,
                          recipient=RECIPIENT, timeout=timeout)
        if not res.ok:
            return DrainRecord("backupmx", n, 0, 0, 0, 0, 0, False, f"load failed: {res.output[-300:]}")
        held = node.wait_queue_count(n, timeout=60)
        load = time.perf_counter() - started
        if held != n:
            return DrainRecord("backupmx", n, load, 0, 0, 0, 0, False, f"held {held} of {n}")
        time.sleep(3)  # a few failed probes: the outage is declared, as it would be in a real one
        with SmtpSink("127.0.0.1", primary_port) as sink:
            first, all_in, empty = watch_drain(sink, n, node.queue_count, timeout=timeout, queue_poll=0.2)
            got = sink.wait_messages(n, timeout=5)
            rss = node.memory().get("VmHWM", 0)
        ok = got == n and not math.isnan(empty)
        return DrainRecord("backupmx", n, load, first, all_in, empty, got, ok,
                           "" if ok else f"sink got {got} of {n}, queue {node.queue_count()}", rss)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, help="messages held (default 20000; --quick 2000)")
    ap.add_argument("--size-kb", type=float, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["postfix", "backupmx"])
    ap.add_argument("--probe-interval", default="1s", help="backupmx delivery.probe_interval (default 1s)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds for each load and each drain")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    n = args.messages or (2000 if args.quick else 20000)
    if cannot_run(postfix=args.only != "backupmx"):
        return 2
    records: list[DrainRecord] = []
    pending = ""
    with contextlib.ExitStack() as stack:
        work = work_dir(stack, "drain")
        if args.only != "backupmx":
            rec = drain_postfix(n, args.size_kb, args.timeout)
            records.append(rec)
            print(f"postfix: queue empty {rec.queue_empty:.2f}s after the primary came back "
                  f"({rec.rate:.0f} msg/s) {'ok' if rec.valid else 'INVALID: ' + rec.detail}", flush=True)
        if args.only != "postfix":
            try:
                rec = drain_backupmx(n, args.size_kb, args.timeout, work, args.probe_interval)
                records.append(rec)
                print(f"backupmx: queue empty {rec.queue_empty:.2f}s after the primary came back "
                      f"({rec.rate:.0f} msg/s) {'ok' if rec.valid else 'INVALID: ' + rec.detail}", flush=True)
            except BackupmxUnavailable as e:
                pending = str(e).splitlines()[0]
                print(f"backupmx: pending ({pending})", flush=True)
    print()
    print(machine_line())
    print(f"\nDrain of {n:,} x {args.size_kb:g} KB held messages to smtp-sink, seconds from the primary's return:")
    rows = [[r.target, fmt(r.load_seconds, 1), fmt(r.first_at_primary, 2), fmt(r.all_at_primary, 2),
             fmt(r.queue_empty, 2), fmt(r.rate), f"{r.sink_count:,}",
             f"{r.peak_rss_kib / 1024:.0f} MiB" if r.peak_rss_kib else "-",
             "ok" if r.valid else f"INVALID: {r.detail}"] for r in records]
    if pending:
        rows.append(["backupmx", "pending", "", "", "", "", "", "", pending])
    print(table(["server", "load s", "first at primary", "all at primary", "queue empty", "msg/s",
                 "sink count", "peak RSS", "check"], rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "messages": n, "size_kb": args.size_kb,
                                         "records": [asdict(r) for r in records], "pending": pending},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
