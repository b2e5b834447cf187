"""Accept rate and latency of backupmx against a Postfix backup MX, both holding mail for a primary that
is down (nothing listens on its port), both storing durably before 250 (Postfix fsyncs queue files).

backupmx runs in the operator's setup by default (a recipient file, the admin listener on, the mail log on
stderr redirected to a file, the spool kept across runs so the queue grows, as it does through an outage;
Postfix's queue grows too); `--lab-setup` is the former one (recipients = "any", no admin listener, mail
log in a file, both queues emptied before each run).
Load: Postfix's smtp-source, one message per session, for each cell (message size x concurrency),
interleaving Postfix and backupmx runs (order alternating per repeat), R repeats. After each run the
queue must hold exactly what it held before plus what was sent (Postfix: queue files and `postqueue -p`;
backupmx: `backupmx queue count`), or the run is reported as invalid, not as a figure.
Latency: our asyncio client (bench/latency.py) at the given concurrency, p50/p99 per message, repeated.

    .venv/bin/python bench/accept.py            # 1000 msgs/run, 5 repeats, 6 cells, latency at c=50
    .venv/bin/python bench/accept.py --quick    # 200 msgs/run, 2 repeats
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

if __package__ in (None, ""):  # run as a file: make `bench` and `tests.support` importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from bench.backupmx_node import BackupmxNode, BackupmxUnavailable, add_setup_options, chosen_setup, setup_description
from bench.figures import (
    fmt,
    fmt_triple,
    geomean,
    load_average,
    machine,
    machine_line,
    percentile,
    summary,
    table,
)
from bench.latency import latency
from bench.preflight import cannot_run, work_dir
from tests.support.ports import free_port
from tests.support.postfix import (
    PostfixInstance,
    smtp_source,
)

RECIPIENT = "alice@example.test"
SENDER = "sender@source.test"


class Target(Protocol):
    name: str
    host: str
    port: int

    def reset(self) -> None: ...

    def verify(self, expected: int) -> tuple[bool, str]: ...


class PostfixTarget:
    """keep=True: the queue grows from run to run (verify counts on top of what it held)."""

    name = "postfix"

    def __init__(self, pf: PostfixInstance, *, keep: bool) -> None:
        self.pf = pf
        self.host, self.port = pf.host, pf.port
        self.keep = keep
        self.held = 0

    def reset(self) -> None:
        if self.keep:
            return
        self.pf.purge()
        if self.pf.wait_queue_count(0, timeout=60) != 0:
            raise RuntimeError("postfix queue did not empty after postsuper -d ALL")
        self.held = 0

    def verify(self, expected: int) -> tuple[bool, str]:
        want = self.held + expected
        counts = self.pf.wait_settled(want, timeout=120)
        n = self.pf.postqueue_count()
        ok = counts["deferred"] == want and sum(counts.values()) == want and n == want
        self.held = n  # an invalid run: the next one counts from what is really there
        return ok, f"queue files {counts}, postqueue -p {n} (expected {want})"


class BackupmxTarget:
    """keep=True: the spool grows from run to run (verify counts on top of what it held)."""

    name = "backupmx"

    def __init__(self, node: BackupmxNode, *, keep: bool) -> None:
        self.node = node
        self.host, self.port = node.host, node.port
        self.keep = keep
        self.held = 0

    def reset(self) -> None:
        if self.keep:
            return
        self.node.reset()
        self.held = 0

    def verify(self, expected: int) -> tuple[bool, str]:
        want = self.held + expected
        n = self.node.wait_queue_count(want, timeout=60)
        self.held = n
        return n == want, f"backupmx queue count {n} (expected {want})"


@dataclass
class RunRecord:
    target: str
    size_kb: int
    concurrency: int
    repeat: int
    messages: int
    elapsed: float
    rate: float
    valid: bool
    detail: str = ""


@dataclass
class LatencyRecord:
    target: str
    size_kb: int
    concurrency: int
    repeat: int
    sent: int
    errors: int
    elapsed: float
    total_p50: float
    total_p99: float
    commit_p50: float
    commit_p99: float
    valid: bool
    detail: str = ""


@dataclass
class Results:
    machine: dict[str, str]
    args: dict[str, object]
    config: str = ""
    event_loop: str = ""
    load_start: str = ""
    load_end: str = ""
    runs: list[RunRecord] = field(default_factory=list)
    latency: list[LatencyRecord] = field(default_factory=list)
    pending: str = ""


def parse_cells(text: str) -> list[tuple[int, int]]:
    cells = []
    for item in text.split(","):
        size, _, conc = item.strip().lower().partition("x")
        cells.append((int(size), int(conc)))
    return cells


def throughput_run(t: Target, size_kb: int, conc: int, repeat: int, messages: int, timeout: float) -> RunRecord:
    t.reset()
    res = smtp_source(
        t.host,
        t.port,
        messages=messages,
        sessions=conc,
        size_kb=size_kb,
        sender=SENDER,
        recipient=RECIPIENT,
        timeout=timeout,
    )
    valid, detail = (False, f"smtp-source failed: {res.output.strip()[-300:]}") if not res.ok else t.verify(messages)
    return RunRecord(t.name, size_kb, conc, repeat, messages, res.elapsed, res.rate, valid, detail)


def latency_run(t: Target, size_kb: int, conc: int, repeat: int, messages: int, timeout: float) -> LatencyRecord:
    t.reset()
    run = latency(
        t.host,
        t.port,
        messages=messages,
        concurrency=conc,
        size_bytes=size_kb * 1024,
        sender=SENDER,
        recipient=RECIPIENT,
        overall_timeout=timeout,
    )
    valid, detail = t.verify(run.sent)
    if run.errors:
        valid, detail = False, f"{len(run.errors)} errors, first: {run.errors[0]}; {detail}"
    return LatencyRecord(
        t.name,
        size_kb,
        conc,
        repeat,
        run.sent,
        len(run.errors),
        run.elapsed,
        percentile(run.total, 50),
        percentile(run.total, 99),
        percentile(run.commit, 50),
        percentile(run.commit, 99),
        valid,
        detail,
    )


def latency_report(records: list[LatencyRecord], names: list[str]) -> str:
    """Per cell and server: min / median / max over the repeats of p50 and p99 (ms); with both servers,
    the paired ratio of p99 backupmx/postfix per repeat (below 1: backupmx's tail is shorter)."""
    out = ["\nPer-message latency (bench/latency.py, one message per session), ms, min / median / max over repeats:"]
    cells = sorted({(lr.size_kb, lr.concurrency) for lr in records})
    rows = []
    for size, conc in cells:
        for n in names:
            rs = [lr for lr in records if lr.valid and lr.target == n and (lr.size_kb, lr.concurrency) == (size, conc)]
            p99_ratio = "-"
            if n == "backupmx" and "postfix" in names:
                pf = {
                    lr.repeat: lr.total_p99
                    for lr in records
                    if lr.valid and lr.target == "postfix" and (lr.size_kb, lr.concurrency) == (size, conc)
                }
                ratios = [lr.total_p99 / pf[lr.repeat] for lr in rs if pf.get(lr.repeat)]
                if ratios:
                    lo, mid, hi = summary(ratios)
                    p99_ratio = f"{fmt(mid, 2)} ({fmt(lo, 2)}-{fmt(hi, 2)})"
            rows.append(
                [
                    f"{size} KB x {conc}",
                    n,
                    str(len(rs)),
                    fmt_triple([lr.total_p50 * 1000 for lr in rs], 1),
                    fmt_triple([lr.total_p99 * 1000 for lr in rs], 1),
                    fmt_triple([lr.commit_p99 * 1000 for lr in rs], 1),
                    fmt_triple([lr.sent / lr.elapsed for lr in rs if lr.elapsed]),
                    p99_ratio,
                ]
            )
    out.append(
        table(
            [
                "size x conc",
                "server",
                "runs",
                "total p50",
                "total p99",
                "commit p99",
                "msg/s",
                "p99 backupmx/postfix paired",
            ],
            rows,
        )
    )
    return "\n".join(out)


def report(results: Results, cells: list[tuple[int, int]], names: list[str]) -> str:
    out = [
        machine_line(),
        f"load average (1/5/15 min) at start {results.load_start}, at end {results.load_end}",
        f"backupmx: {results.config}; event loop of serve: {results.event_loop}",
        "",
    ]
    rates: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    by_repeat: dict[tuple[str, int, int, int], float] = {}
    invalid = [r for r in results.runs if not r.valid]
    for r in results.runs:
        if r.valid:
            rates[(r.target, r.size_kb, r.concurrency)].append(r.rate)
            by_repeat[(r.target, r.size_kb, r.concurrency, r.repeat)] = r.rate
    paired = "backupmx" in names and "postfix" in names
    headers = ["size x conc"] + [f"{n} msg/s min / median / max" for n in names]
    if paired:
        headers.append("backupmx/postfix paired, median (min-max)")
    elif "backupmx" not in names:
        headers.append("backupmx")
    rows = []
    cell_ratios = []
    for size, conc in cells:
        row = [f"{size} KB x {conc}"] + [fmt_triple(rates[(n, size, conc)]) for n in names]
        if paired:
            ratios = [
                by_repeat[("backupmx", s, c, rep)] / rate
                for (tgt, s, c, rep), rate in by_repeat.items()
                if tgt == "postfix" and (s, c) == (size, conc) and ("backupmx", s, c, rep) in by_repeat
            ]
            lo, mid, hi = summary(ratios)
            row.append(f"{fmt(mid, 2)} ({fmt(lo, 2)}-{fmt(hi, 2)})" if ratios else "-")
            if ratios:
                cell_ratios.append(mid)
        elif "backupmx" not in names:
            row.append("pending")
        rows.append(row)
    out.append("Accept rate, one message per session (smtp-source), valid runs only:")
    out.append(table(headers, rows))
    if cell_ratios:
        out.append(f"\ngeometric mean of the per-cell median ratios backupmx/postfix: {geomean(cell_ratios):.2f}")
    if results.latency:
        out.append(latency_report(results.latency, names))
    if invalid:
        out.append("\nINVALID runs (not counted):")
        out.extend(f"  {r.target} {r.size_kb} KB x {r.concurrency} repeat {r.repeat}: {r.detail}" for r in invalid)
    bad_lat = [lr for lr in results.latency if not lr.valid]
    out.extend(f"  latency {lr.target} {lr.size_kb} KB x {lr.concurrency}: {lr.detail}" for lr in bad_lat)
    if results.pending:
        out.append(f"\nbackupmx: pending ({results.pending})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, help="messages per run (default 1000; --quick 200)")
    ap.add_argument("--repeat", type=int, help="repeats per cell (default 5; --quick 2)")
    ap.add_argument(
        "--cells", default="5x1,5x10,5x50,100x1,100x10,100x50", help="SIZE_KBxCONCURRENCY list (default %(default)s)"
    )
    ap.add_argument(
        "--latency-concurrency",
        default="50",
        help="concurrency list for the latency client, empty = skip (default %(default)s)",
    )
    ap.add_argument("--latency-messages", type=int, help="messages per latency run (default = --messages)")
    ap.add_argument("--quick", action="store_true", help="fewer messages and repeats")
    ap.add_argument("--only", choices=["postfix", "backupmx"], help="measure one server only")
    ap.add_argument("--run-timeout", type=float, default=900.0, help="seconds per run before it is killed")
    ap.add_argument("--latency-repeat", type=int, help="repeats of each latency run (default 3; --quick 2)")
    add_setup_options(ap, ", queues emptied before each run")
    ap.add_argument("--json", type=Path, help="write raw results here")
    args = ap.parse_args(argv)
    messages = args.messages or (200 if args.quick else 1000)
    repeat = args.repeat or (2 if args.quick else 5)
    lat_repeat = args.latency_repeat or (2 if args.quick else 3)
    setup = chosen_setup(args)
    keep = setup == "operator"
    cells = parse_cells(args.cells)
    lat_conc = [int(c) for c in args.latency_concurrency.split(",") if c.strip()]
    lat_messages = args.latency_messages or messages
    if cannot_run(postfix=args.only != "backupmx"):
        return 2

    results = Results(
        machine=machine(),
        args={
            "messages": messages,
            "repeat": repeat,
            "cells": args.cells,
            "latency_concurrency": lat_conc,
            "latency_messages": lat_messages,
            "latency_repeat": lat_repeat,
            "setup": setup,
        },
        config=setup_description(setup),
        load_start=load_average(),
    )
    targets: list[Target] = []
    with contextlib.ExitStack() as stack:
        work = work_dir(stack, "accept")
        if args.only != "backupmx":
            pf = stack.enter_context(PostfixInstance("backup", domain="example.test"))
            targets.append(PostfixTarget(pf, keep=keep))
        if args.only != "postfix":
            node = stack.enter_context(
                BackupmxNode(
                    work / "backupmx",
                    domains={"example.test": free_port()},
                    setup=setup,
                    recipients=[RECIPIENT],
                    asyncio_loop=args.asyncio_loop,
                )
            )
            try:
                node.start()
                results.event_loop = node.event_loop()
                print(f"backupmx: {results.config}; event loop {results.event_loop}", flush=True)
                targets.append(BackupmxTarget(node, keep=keep))
            except BackupmxUnavailable as e:
                results.pending = str(e).splitlines()[0]
                print(f"backupmx: pending ({results.pending})", flush=True)
        if not targets:
            return 2
        started = time.monotonic()
        for rep in range(repeat):
            for size, conc in cells:
                order = targets if rep % 2 == 0 else list(reversed(targets))
                for t in order:
                    rec = throughput_run(t, size, conc, rep, messages, args.run_timeout)
                    results.runs.append(rec)
                    print(
                        f"[{time.monotonic() - started:7.1f}s] repeat {rep + 1}/{repeat} {size:>3} KB x {conc:>2} "
                        f"{t.name:<8} {rec.rate:8.1f} msg/s  {'ok' if rec.valid else 'INVALID: ' + rec.detail}",
                        flush=True,
                    )
        for rep in range(lat_repeat):
            for size in sorted({s for s, _ in cells}):
                for conc in lat_conc:
                    for t in targets if rep % 2 == 0 else list(reversed(targets)):
                        lrec = latency_run(t, size, conc, rep, lat_messages, args.run_timeout)
                        results.latency.append(lrec)
                        print(
                            f"[{time.monotonic() - started:7.1f}s] latency repeat {rep + 1}/{lat_repeat} "
                            f"{size:>3} KB x {conc:>2} {t.name:<8} p50 {lrec.total_p50 * 1000:.1f} ms "
                            f"p99 {lrec.total_p99 * 1000:.1f} ms "
                            f"{'ok' if lrec.valid else 'INVALID: ' + lrec.detail}",
                            flush=True,
                        )
    results.load_end = load_average()
    print()
    print(report(results, cells, [t.name for t in targets]))
    if args.json:
        args.json.write_text(json.dumps(asdict(results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
