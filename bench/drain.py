"""Drain after an outage: N messages are held while the primary is down (nothing listens on its port),
then the primary comes back (smtp-sink starts on that port) and we time until the queue is empty.

Postfix (a backup MX with relay_domains + transport to the primary): `postqueue -f` right when the sink
is up, as an operator would (without it, Postfix waits for each message's retry time, minutes).
backupmx: nothing is done; its health probe (probe_interval 1s here, 30s by default) sees the primary
come back and delivery starts on its own, so its figure includes the detection delay (reported apart).
Same N, same message size, same smtp-sink flags. Every message must reach the sink exactly once
(the sink's count equals N) or the run is reported invalid. R repeats, Postfix and backupmx interleaved
(order alternating per repeat); each figure is printed as min / median / max over them.

backupmx runs in the operator's setup by default (a recipient file, the admin listener on, the mail log on
stderr redirected to a file) and both servers keep their spool from repeat to repeat (one Postfix, one
serve for the whole bench); `--lab-setup` is the former (recipients = "any", no admin listener, mail log
in a file, a fresh server and spool for every run).

    .venv/bin/python bench/drain.py             # 20,000 x 5 KB, 3 repeats
    .venv/bin/python bench/drain.py --quick     # 2,000 x 5 KB, 2 repeats
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

from bench.backupmx_node import (
    BackupmxNode,
    BackupmxUnavailable,
    Setup,
    add_setup_options,
    chosen_setup,
    setup_description,
)
from bench.figures import fmt_triple, load_average, machine, machine_line, summary, table
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
    repeat: int
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


def watch_drain(
    sink: SmtpSink, expected: int, queue_count: Callable[[], int], *, timeout: float, queue_poll: float
) -> tuple[float, float, float]:
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


class PostfixDrain:
    """A Postfix backup MX for the drain runs; keep=True: one instance for every repeat."""

    name = "postfix"

    def __init__(self, stack: contextlib.ExitStack, *, keep: bool) -> None:
        self.stack, self.keep = stack, keep
        self.pf: PostfixInstance | None = None

    def run(self, rep: int, n: int, size_kb: float, timeout: float) -> DrainRecord:
        if self.pf is None or not self.keep:
            if self.pf is not None:
                self.pf.close()
            self.pf = self.stack.enter_context(PostfixInstance("backup", domain="example.test"))
        pf = self.pf
        started = time.perf_counter()
        res = smtp_source(
            pf.host, pf.port, messages=n, sessions=LOAD_SESSIONS, size_kb=size_kb, recipient=RECIPIENT, timeout=timeout
        )
        if not res.ok:
            return DrainRecord("postfix", rep, n, 0, 0, 0, 0, 0, False, f"load failed: {res.output[-300:]}")
        counts = pf.wait_settled(n, timeout=timeout)
        load = time.perf_counter() - started
        held = pf.postqueue_count()
        if held != n:
            return DrainRecord("postfix", rep, n, load, 0, 0, 0, 0, False, f"held {held} of {n}: {counts}")
        host, port = pf.relay
        with SmtpSink(host, port) as sink:  # the primary is back where it was
            pf.flush()
            first, all_in, empty = watch_drain(sink, n, pf.queue_count, timeout=timeout, queue_poll=0.05)
            got = sink.wait_messages(n, timeout=5)
        ok = got == n and not math.isnan(empty)
        return DrainRecord(
            "postfix",
            rep,
            n,
            load,
            first,
            all_in,
            empty,
            got,
            ok,
            "" if ok else f"sink got {got} of {n}, queue {pf.queue_count()}",
        )


class BackupmxDrain:
    """A backupmx serve for the drain runs; setup "operator": one serve and spool for every repeat."""

    name = "backupmx"

    def __init__(
        self, stack: contextlib.ExitStack, work: Path, *, setup: Setup, probe_interval: str, asyncio_loop: bool = False
    ) -> None:
        self.stack, self.work, self.setup, self.probe_interval = stack, work, setup, probe_interval
        self.asyncio_loop = asyncio_loop
        self.node: BackupmxNode | None = None
        self.primary_port = 0
        self.event_loop = ""

    def _node(self, rep: int) -> BackupmxNode:
        if self.node is not None and self.setup == "operator":
            return self.node
        if self.node is not None:
            self.node.stop()
        self.primary_port = free_port()
        self.node = self.stack.enter_context(
            BackupmxNode(
                self.work / f"drain{rep}",
                domains={"example.test": self.primary_port},
                delivery={"probe_interval": self.probe_interval},
                setup=self.setup,
                recipients=[RECIPIENT],
                asyncio_loop=self.asyncio_loop,
            )
        )
        self.node.start()
        self.event_loop = self.node.event_loop()
        return self.node

    def run(self, rep: int, n: int, size_kb: float, timeout: float) -> DrainRecord:
        node = self._node(rep)
        if node.queue_count() != 0:
            return DrainRecord("backupmx", rep, n, 0, 0, 0, 0, 0, False, "queue not empty before the load")
        started = time.perf_counter()
        res = smtp_source(
            node.host,
            node.port,
            messages=n,
            sessions=LOAD_SESSIONS,
            size_kb=size_kb,
            recipient=RECIPIENT,
            timeout=timeout,
        )
        if not res.ok:
            return DrainRecord("backupmx", rep, n, 0, 0, 0, 0, 0, False, f"load failed: {res.output[-300:]}")
        held = node.wait_queue_count(n, timeout=60)
        load = time.perf_counter() - started
        if held != n:
            return DrainRecord("backupmx", rep, n, load, 0, 0, 0, 0, False, f"held {held} of {n}")
        time.sleep(3)  # a few failed probes: the outage is declared, as it would be in a real one
        with SmtpSink("127.0.0.1", self.primary_port) as sink:
            first, all_in, empty = watch_drain(sink, n, node.queue_count, timeout=timeout, queue_poll=0.2)
            got = sink.wait_messages(n, timeout=5)
            rss = node.memory().get("VmHWM", 0)
        ok = got == n and not math.isnan(empty)
        return DrainRecord(
            "backupmx",
            rep,
            n,
            load,
            first,
            all_in,
            empty,
            got,
            ok,
            "" if ok else f"sink got {got} of {n}, queue {node.queue_count()}",
            rss,
        )


def report(records: list[DrainRecord], n: int, size_kb: float, names: list[str]) -> str:
    """Per server: min / median / max over the valid repeats; with both, the paired rate ratio."""
    rows = []
    for name in names:
        rs = [r for r in records if r.target == name and r.valid]
        rows.append(
            [
                name,
                f"{len(rs)} of {sum(1 for r in records if r.target == name)}",
                fmt_triple([r.load_seconds for r in rs], 1),
                fmt_triple([r.first_at_primary for r in rs], 2),
                fmt_triple([r.queue_empty for r in rs], 2),
                fmt_triple([r.rate for r in rs]),
                fmt_triple([r.peak_rss_kib / 1024 for r in rs if r.peak_rss_kib]),
            ]
        )
    out = [
        f"Drain of {n:,} x {size_kb:g} KB held messages to smtp-sink, seconds from the primary's return, "
        "min / median / max over the valid repeats:",
        table(["server", "valid runs", "load s", "first at primary", "queue empty", "msg/s", "peak RSS MiB"], rows),
    ]
    by = {(r.target, r.repeat): r.rate for r in records if r.valid}
    ratios = [
        by[("backupmx", rep)] / rate
        for (t, rep), rate in by.items()
        if t == "postfix" and rate > 0 and ("backupmx", rep) in by
    ]
    if ratios:
        lo, mid, hi = summary(ratios)
        out.append(f"\ndrain rate backupmx/postfix, paired per repeat: median {mid:.2f} (min {lo:.2f}, max {hi:.2f})")
    bad = [r for r in records if not r.valid]
    if bad:
        out.append("\nINVALID runs (not counted):")
        out.extend(f"  {r.target} repeat {r.repeat + 1}: {r.detail}" for r in bad)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, help="messages held (default 20000; --quick 2000)")
    ap.add_argument("--size-kb", type=float, default=5)
    ap.add_argument("--repeat", type=int, help="runs per server, interleaved (default 3; --quick 2)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["postfix", "backupmx"])
    ap.add_argument("--probe-interval", default="1s", help="backupmx delivery.probe_interval (default 1s)")
    add_setup_options(ap, ", a fresh server and spool for every run")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds for each load and each drain")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    n = args.messages or (2000 if args.quick else 20000)
    repeat = args.repeat or (2 if args.quick else 3)
    setup = chosen_setup(args)
    if cannot_run(postfix=args.only != "backupmx"):
        return 2
    load_start = load_average()
    records: list[DrainRecord] = []
    pending = ""
    bmx: BackupmxDrain | None = None
    with contextlib.ExitStack() as stack:
        work = work_dir(stack, "drain")
        targets: list[PostfixDrain | BackupmxDrain] = []
        if args.only != "backupmx":
            targets.append(PostfixDrain(stack, keep=setup == "operator"))
        if args.only != "postfix":
            bmx = BackupmxDrain(
                stack, work, setup=setup, probe_interval=args.probe_interval, asyncio_loop=args.asyncio_loop
            )
            targets.append(bmx)
        for rep in range(repeat):
            for t in targets if rep % 2 == 0 else list(reversed(targets)):
                if t is bmx and pending:
                    continue
                try:
                    rec = t.run(rep, n, args.size_kb, args.timeout)
                except BackupmxUnavailable as e:
                    pending = str(e).splitlines()[0]
                    print(f"backupmx: pending ({pending})", flush=True)
                    continue
                records.append(rec)
                print(
                    f"repeat {rep + 1}/{repeat} {rec.target}: queue empty {rec.queue_empty:.2f}s after the "
                    f"primary came back ({rec.rate:.0f} msg/s) {'ok' if rec.valid else 'INVALID: ' + rec.detail}",
                    flush=True,
                )
    load_end = load_average()
    event_loop = bmx.event_loop if bmx is not None else ""
    print()
    print(machine_line())
    print(f"load average (1/5/15 min) at start {load_start}, at end {load_end}")
    print(
        f"backupmx: {setup_description(setup)}; delivery.probe_interval {args.probe_interval}; "
        f"event loop of serve: {event_loop or '-'}\n"
    )
    print(report(records, n, args.size_kb, [t.name for t in targets]))
    if pending:
        print(f"\nbackupmx: pending ({pending})")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "messages": n,
                    "size_kb": args.size_kb,
                    "setup": setup,
                    "repeat": repeat,
                    "event_loop": event_loop,
                    "load_start": load_start,
                    "load_end": load_end,
                    "records": [asdict(r) for r in records],
                    "pending": pending,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
