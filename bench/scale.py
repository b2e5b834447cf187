"""A big queue: N messages (default 1,000,000) are put into the SQLite spool through its API
(SqliteSpool.put_with_id, concurrent puts in batches, so they group-commit as accepted mail does); then
`backupmx serve` starts on that spool (operator's setup: recipient file, admin listener, mail log on
stderr; `--lab-setup` for the former) and we measure: time until it greets 220, its memory (VmRSS right
after start, after a while, and VmHWM at the end), the latency of `backupmx queue count` and of the
first page of `backupmx queue list`, the accept rate with the full queue against the same serve
setup with an empty one (smtp-source, interleaved, --accept-repeat times), the drain of a slice
(default 100,000) whose primary comes back (smtp-sink), while the rest stays held for a primary that
is still down, and the restart time (stop, start to 220) --accept-repeat times.

    .venv/bin/python bench/scale.py               # 1,000,000 messages of 2 KB, slice 100,000
    .venv/bin/python bench/scale.py --quick       # 20,000 messages, slice 2,000
    .venv/bin/python bench/scale.py --workdir /var/tmp/bmx-scale --keep   # reuse the filled spool next time
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` and `tests.support` importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from bench.backupmx_node import (
    BackupmxNode,
    BackupmxUnavailable,
    add_setup_options,
    backupmx_command,
    chosen_setup,
    setup_description,
)
from bench.drain import watch_drain
from bench.figures import fmt, fmt_triple, load_average, machine, machine_line, summary, table
from bench.signals import exit_on_sigterm
from tests.support.ports import free_port
from tests.support.postfix import SmtpSink, smtp_source, tools_unavailable_reason

HELD_DOMAIN = "example.test"  # its primary stays down
SLICE_DOMAIN = "slice.test"  # its primary comes back (smtp-sink)
NODE = "backup.test"


def make_body(qid: str, i: int, domain: str, size: int) -> bytes:
    head = (
        f"Received: from source.test (source.test [127.0.0.1])\r\n\tby {NODE} (backupmx) with ESMTP id {qid}"
        f"\r\n\tfor <user{i}@{domain}>; Tue, 24 Nov 2026 12:00:00 +0000\r\n"
        f"From: <sender@source.test>\r\nTo: <user{i}@{domain}>\r\nSubject: scale {i}\r\n"
        f"Message-ID: <{i}.scale@source.test>\r\n\r\n"
    ).encode()
    line = b"X" * 78 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def in_slice(i: int, n: int, slice_n: int) -> bool:
    """Spread the slice evenly over the fill, so a fill cut short keeps the proportion."""
    return slice_n > 0 and (i * slice_n) // n != ((i + 1) * slice_n) // n


async def fill_spool(
    data_dir: Path, n: int, slice_n: int, size: int, batch: int, budget: float
) -> tuple[int, int, float]:
    """Put up to n messages, slice_n of them for SLICE_DOMAIN, within `budget` seconds.
    Returns (messages put, of which in the slice, seconds)."""
    from backupmx.model import Envelope, Recipient, new_queue_id
    from backupmx.spool.body import BodyBuffer
    from backupmx.spool.sqlite import SqliteSpool

    spool = SqliteSpool(data_dir, node=NODE)
    await spool.open()
    started = time.perf_counter()
    done = sliced = 0
    try:

        async def put(i: int) -> None:
            domain = SLICE_DOMAIN if in_slice(i, n, slice_n) else HELD_DOMAIN
            qid = new_queue_id()
            env = Envelope(
                sender="sender@source.test",
                recipients=(Recipient(f"user{i}@{domain}"),),
                client_ip="127.0.0.1",
                client_helo="source.test",
            )
            with BodyBuffer.from_bytes(make_body(qid, i, domain, size)) as body:
                await spool.put_with_id(qid, env, body)

        next_report = 50_000
        last_report = started
        while done < n:
            k = min(batch, n - done)
            t_batch = time.perf_counter()
            await asyncio.gather(*(put(done + j) for j in range(k)))
            sliced += sum(1 for j in range(k) if in_slice(done + j, n, slice_n))
            done += k
            now = time.perf_counter()
            if done >= next_report or done == n or now - last_report > 60:
                print(
                    f"  filled {done:,}/{n:,} in {now - started:.0f}s: {done / (now - started):,.0f} puts/s "
                    f"overall, {k / (now - t_batch):,.0f} puts/s in the last batch",
                    flush=True,
                )
                while next_report <= done:
                    next_report += 50_000
                last_report = now
            if now - started > budget and done < n:
                print(f"  fill budget of {budget:g}s spent: stopping at {done:,} messages", flush=True)
                break
    finally:
        await spool.close()
    return done, sliced, time.perf_counter() - started


@dataclass
class ScaleFigures:
    messages: int
    slice: int
    size_kb: float
    fill_seconds: float = math.nan  # NaN when a kept spool was reused
    spool_bytes: int = 0
    start_to_220_s: float = math.nan
    rss_after_start_kib: int = 0
    rss_after_settle_kib: int = 0
    cli_baseline_s: float = math.nan
    queue_count_s: float = math.nan
    queue_count: int = -1
    queue_list_first_page_s: float = math.nan
    slice_first_s: float = math.nan
    slice_all_at_primary_s: float = math.nan
    slice_done_s: float = math.nan
    slice_sink_count: int = -1
    queue_count_after: int = -1
    rss_hwm_kib: int = 0
    rss_end_kib: int = 0
    stop_exit: int | None = None
    pending: str = ""
    accept_full: list[float] = field(default_factory=list)  # msg/s into the full queue, per repeat
    accept_empty: list[float] = field(default_factory=list)  # msg/s into an empty queue, per repeat
    accept_invalid: int = 0
    restart_s: list[float] = field(default_factory=list)  # stop + start to 220 on the full queue
    accepted_extra: int = 0  # what the accept runs added to the full queue (held with the rest)

    @property
    def valid(self) -> bool:
        return (
            self.queue_count == self.messages
            and self.slice_sink_count == self.slice
            and self.queue_count_after == self.messages - self.slice + self.accepted_extra
        )

    def accept_ratio(self) -> str:
        ratios = [f / e for f, e in zip(self.accept_full, self.accept_empty, strict=False) if e > 0]
        if not ratios:
            return "-"
        lo, mid, hi = summary(ratios)
        invalid = f", {self.accept_invalid} INVALID runs" if self.accept_invalid else ""
        return f"{mid:.2f} ({lo:.2f}-{hi:.2f}){invalid}"

    def rows(self) -> list[list[str]]:
        mib = 1024
        return [
            [
                "fill via SqliteSpool.put_with_id",
                f"{fmt(self.messages / self.fill_seconds)} puts/s" if self.fill_seconds > 0 else "reused",
            ],
            ["start to 220", f"{self.start_to_220_s:.2f} s"],
            [
                "RSS after start / after settle",
                f"{self.rss_after_start_kib / mib:.0f} / {self.rss_after_settle_kib / mib:.0f} MiB",
            ],
            ["`queue count` (CLI wall time)", f"{self.queue_count_s:.2f} s (= {self.queue_count:,})"],
            ["`queue list --limit 100`", f"{self.queue_list_first_page_s:.2f} s"],
            ["CLI baseline (`config check`)", f"{self.cli_baseline_s:.2f} s"],
            [
                f"drain of {self.slice:,}: first / all at primary",
                f"{fmt(self.slice_first_s, 2)} / {fmt(self.slice_all_at_primary_s, 2)} s",
            ],
            [
                f"drain of {self.slice:,}: done in queue",
                f"{fmt(self.slice_done_s, 2)} s ({fmt(self.slice / self.slice_done_s)} msg/s)",
            ],
            ["RSS peak (VmHWM) / at end", f"{self.rss_hwm_kib / mib:.0f} / {self.rss_end_kib / mib:.0f} MiB"],
            ["accept msg/s, full queue (min / median / max)", fmt_triple(self.accept_full)],
            ["accept msg/s, empty queue (min / median / max)", fmt_triple(self.accept_empty)],
            ["accept full / empty, paired (median, min-max)", self.accept_ratio()],
            ["restart: stop, start to 220 (min / median / max)", fmt_triple(self.restart_s, 2) + " s"],
            [
                "check",
                "ok"
                if self.valid
                else f"INVALID: count {self.queue_count}, sink {self.slice_sink_count}, after {self.queue_count_after}",
            ],
        ]


def timed_cli(node: BackupmxNode, *args: str, runs: int = 3) -> tuple[float, str]:
    """Median wall seconds of `backupmx <args> --config FILE` over `runs`, and the last output."""
    times = []
    out = ""
    for _ in range(runs):
        t = time.perf_counter()
        out = node.cli(*args).stdout
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def accept_rate(node: BackupmxNode, messages: int, size_kb: float, sessions: int, timeout: float) -> float | None:
    """msg/s of smtp-source into `node` (its primary down), or None when the queue did not grow by exactly
    `messages` (an invalid run)."""
    before = node.queue_count()
    res = smtp_source(
        node.host,
        node.port,
        messages=messages,
        sessions=sessions,
        size_kb=size_kb,
        recipient=f"alice@{HELD_DOMAIN}",
        timeout=timeout,
    )
    got = node.wait_queue_count(before + messages, timeout=60)
    return res.rate if res.ok and got == before + messages else None


def compare_accept(
    full: BackupmxNode,
    empty: BackupmxNode,
    fig: ScaleFigures,
    *,
    messages: int,
    repeat: int,
    size_kb: float,
    sessions: int,
    timeout: float,
) -> None:
    """Accept into the full queue and into an empty one, interleaved; the empty one is emptied each time."""
    for rep in range(repeat):
        pair: dict[str, float | None] = {}
        for which in ("full", "empty") if rep % 2 == 0 else ("empty", "full"):
            node = full if which == "full" else empty
            if which == "empty":
                empty.reset()
            pair[which] = accept_rate(node, messages, size_kb, sessions, timeout)
            print(
                f"  accept repeat {rep + 1}/{repeat} {which} queue: {pair[which] or 0:.0f} msg/s"
                f"{'' if pair[which] else ' INVALID'}",
                flush=True,
            )
        f, e = pair["full"], pair["empty"]
        if f is None or e is None:
            fig.accept_invalid += 1
            continue
        fig.accept_full.append(f)
        fig.accept_empty.append(e)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, help="messages in the spool (default 1,000,000; --quick 20,000)")
    ap.add_argument("--slice", type=int, help="of which drained to smtp-sink (default 100,000; --quick 2,000)")
    ap.add_argument("--size-kb", type=float, default=2, help="stored message size (default %(default)s)")
    ap.add_argument("--batch", type=int, default=1000, help="concurrent puts per batch (default %(default)s)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", type=Path, help="where the spool goes (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep --workdir; a later run reuses its spool")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after start before the 2nd RSS reading")
    ap.add_argument(
        "--fill-budget",
        type=float,
        default=3600.0,
        help="seconds the fill may take; it stops there and the rest runs with what is queued",
    )
    ap.add_argument("--timeout", type=float, default=3600.0, help="bound for the start and for the drain")
    ap.add_argument("--accept-messages", type=int, help="messages per accept run (default 2,000; --quick 500)")
    ap.add_argument("--accept-size-kb", type=float, default=5, help="accept runs' message size (default 5)")
    ap.add_argument("--accept-sessions", type=int, default=10, help="accept runs' concurrency (default 10)")
    ap.add_argument(
        "--accept-repeat",
        type=int,
        default=3,
        help="accept runs per queue and restarts (default %(default)s; 0 = skip both)",
    )
    add_setup_options(ap)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    exit_on_sigterm()
    setup = chosen_setup(args)
    accept_messages = args.accept_messages or (500 if args.quick else 2000)
    load_start = load_average()
    loop = "-"
    n = args.messages or (20_000 if args.quick else 1_000_000)
    slice_n = min(n, args.slice if args.slice is not None else (2_000 if args.quick else 100_000))
    reason = tools_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    print(machine_line(), flush=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bmx-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    fig = ScaleFigures(messages=n, slice=slice_n, size_kb=args.size_kb)
    marker = work / "filled.json"
    try:
        held_port, slice_port = free_port(), free_port()
        node = BackupmxNode(
            work / "node",
            domains={HELD_DOMAIN: held_port, SLICE_DOMAIN: slice_port},
            delivery={"probe_interval": "1s"},
            setup=setup,
            recipients=[f"alice@{HELD_DOMAIN}"],
            asyncio_loop=args.asyncio_loop,
        )
        spec = {"messages": n, "slice": slice_n, "size_kb": args.size_kb}
        kept = json.loads(marker.read_text()) if marker.exists() else {}
        if kept.get("spec") == spec:
            print(f"reusing the filled spool in {node.data_dir}", flush=True)
            fig.messages, fig.slice = kept["messages"], kept["slice"]
        else:
            marker.unlink(missing_ok=True)
            shutil.rmtree(node.data_dir, ignore_errors=True)
            print(f"filling the spool: {n:,} messages of {args.size_kb:g} KB ...", flush=True)
            fig.messages, fig.slice, fig.fill_seconds = asyncio.run(
                fill_spool(node.data_dir, n, slice_n, int(args.size_kb * 1024), args.batch, args.fill_budget)
            )
            marker.write_text(json.dumps({"spec": spec, "messages": fig.messages, "slice": fig.slice}))
        held = fig.messages - fig.slice
        fig.spool_bytes = sum(p.stat().st_size for p in node.data_dir.glob("spool.db*"))

        with node:
            try:
                fig.start_to_220_s = node.start(timeout=args.timeout)
            except BackupmxUnavailable as e:
                fig.pending = str(e).splitlines()[0]
                print(f"backupmx: pending ({fig.pending})")
                return 0
            fig.rss_after_start_kib = node.memory()["VmRSS"]
            loop = node.event_loop()
            time.sleep(args.settle)
            fig.rss_after_settle_kib = node.memory()["VmRSS"]
            fig.cli_baseline_s, _ = timed_cli(node, "config", "check")
            fig.queue_count_s, out = timed_cli(node, "queue", "count")
            fig.queue_count = int(out.strip())
            fig.queue_list_first_page_s, _ = timed_cli(node, "queue", "list", "--limit", "100")
            if args.accept_repeat > 0:
                print(
                    f"accept {accept_messages:,} x {args.accept_size_kb:g} KB, {args.accept_sessions} sessions: "
                    "full queue against an empty one ...",
                    flush=True,
                )
                with BackupmxNode(
                    work / "empty",
                    domains={HELD_DOMAIN: held_port, SLICE_DOMAIN: slice_port},
                    delivery={"probe_interval": "1s"},
                    setup=setup,
                    recipients=[f"alice@{HELD_DOMAIN}"],
                    asyncio_loop=args.asyncio_loop,
                ) as empty:
                    empty.start(timeout=args.timeout)
                    compare_accept(
                        node,
                        empty,
                        fig,
                        messages=accept_messages,
                        repeat=args.accept_repeat,
                        size_kb=args.accept_size_kb,
                        sessions=args.accept_sessions,
                        timeout=args.timeout,
                    )
                held = node.queue_count() - fig.slice  # the accept runs' messages stay held too
                fig.accepted_extra = held - (fig.messages - fig.slice)
            with SmtpSink("127.0.0.1", slice_port) as sink:
                fig.slice_first_s, fig.slice_all_at_primary_s, fig.slice_done_s = watch_drain(
                    sink, fig.slice, lambda: max(0, node.queue_count() - held), timeout=args.timeout, queue_poll=0.5
                )
                fig.slice_sink_count = sink.wait_messages(fig.slice, timeout=5)
            fig.queue_count_after = node.queue_count()
            mem = node.memory()
            fig.rss_hwm_kib, fig.rss_end_kib = mem["VmHWM"], mem["VmRSS"]
            fig.stop_exit = node.stop(timeout=120)
            for i in range(args.accept_repeat):
                fig.restart_s.append(node.start(timeout=args.timeout))
                print(f"  restart {i + 1}/{args.accept_repeat}: 220 after {fig.restart_s[-1]:.2f}s", flush=True)
                node.stop(timeout=120)
    finally:
        if not (args.keep and args.workdir):
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(machine_line())
    print(f"load average (1/5/15 min) at start {load_start}, at end {load_average()}")
    print(
        f"backupmx: {setup_description(setup)}; event loop of serve: {loop} "
        "(the big spool was filled through the spool API)"
    )
    if fig.messages < n:
        print(f"\nNOTE: the fill stopped at {fig.messages:,} of {n:,} messages (--fill-budget)")
    print(
        f"\nbackupmx with {fig.messages:,} queued messages of {args.size_kb:g} KB "
        f"(spool {fig.spool_bytes / 1e9:.2f} GB), `{' '.join(backupmx_command())}`:"
    )
    print(table(["figure", "value"], fig.rows()))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), **asdict(fig)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
