"""Where `backupmx serve` spends its CPU, per accepted and per delivered message, in the operator's setup
(bench/backupmx_node.py): the CPU time of the serve process (utime + stime from /proc) divided by the
messages, and py-spy's samples of it folded into the functions that take the most (own time, and time
including what they call). Phase "accept": smtp-source sends N messages to a primary that is down;
phase "deliver": the N held messages drain to smtp-sink once the primary is back.

    .venv/bin/pip install py-spy && .venv/bin/python bench/profile.py            # 5,000 x 5 KB
    .venv/bin/python bench/profile.py --size-kb 100 --messages 2000 --top 25 --raw-dir /tmp/prof
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` and `tests.support` importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from bench.backupmx_node import BackupmxNode, BackupmxUnavailable, add_loop_option, setup_description
from bench.drain import watch_drain
from bench.figures import load_average, machine_line, table
from bench.preflight import cannot_run, work_dir
from tests.support.ports import free_port
from tests.support.postfix import SmtpSink, smtp_source

RECIPIENT = "alice@example.test"
SESSIONS = 10
_FRAME_LINE = re.compile(r":\d+\)$")  # "name (file.py:123)": the line number, dropped to fold per function


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Sampler:
    """py-spy record --format raw on a running process, until stop() (SIGINT makes it write its file)."""

    def __init__(self, exe: str, pid: int, out: Path, rate: int, *, gil: bool) -> None:
        self.out = out
        # --gil: only the thread holding the GIL is sampled, which is the Python code burning CPU; without it
        # threads parked in a queue or a lock (the thread pool, the spool's writer) count as busy
        argv = [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate), "--output", str(out)]
        self.proc = subprocess.Popen(
            [*argv, "--gil"] if gil else argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(0.5)  # attached before the load starts

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def fold(raw: Path) -> tuple[Counter[str], Counter[str], int]:
    """(own samples per function, samples per function including its callees, all samples) from
    py-spy's raw output: one `frame;frame;...;leaf COUNT` a line, the outermost frame first."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_FRAME_LINE.sub(")", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    return own, inclusive, total


def top_table(raw: Path, top: int) -> str:
    own, inclusive, total = fold(raw)
    if not total:
        return "(no samples)"
    rows = [[f"{100 * n / total:.1f}", f"{100 * inclusive[f] / total:.1f}", f] for f, n in own.most_common(top)]
    out = [f"own time, top {top} of {total:,} samples:", table(["% own", "% incl.", "function (file)"], rows)]
    skip = re.compile(
        r"^(<module>|run|run_forever|_run_once|_run|main|serve|run_service|run_until_complete)"
        r" \(|\((runpy|asyncio/(base_events|events|runners))\.py\)|^process "
    )
    rows = [[f"{100 * n / total:.1f}", f] for f, n in inclusive.most_common(top * 3) if not skip.search(f)][:top]
    out += [
        f"\nincluding callees, top {top} (the event loop's own frames left out):",
        table(["% incl.", "function (file)"], rows),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--size-kb", type=float, default=5)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default %(default)s)")
    ap.add_argument(
        "--all-threads",
        action="store_true",
        help="sample every thread, not only the one holding the GIL (waiting threads then count)",
    )
    add_loop_option(ap)
    ap.add_argument("--raw-dir", type=Path, help="keep py-spy's raw files here (accept.txt, deliver.txt)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the load and for the drain")
    args = ap.parse_args(argv)
    exe = py_spy()
    if exe is None:
        print("cannot run: py-spy is not installed (.venv/bin/pip install py-spy)", file=sys.stderr)
        return 2
    if cannot_run(postfix=False):
        return 2
    load_start = load_average()
    with contextlib.ExitStack() as stack:
        work = work_dir(stack, "profile")
        raw_dir = args.raw_dir or work
        raw_dir.mkdir(parents=True, exist_ok=True)
        primary = free_port()
        node = stack.enter_context(
            BackupmxNode(
                work / "node",
                domains={"example.test": primary},
                delivery={"probe_interval": "1s"},
                setup="operator",
                recipients=[RECIPIENT],
                asyncio_loop=args.asyncio_loop,
            )
        )
        try:
            node.start()
        except BackupmxUnavailable as e:
            print(f"backupmx: pending ({str(e).splitlines()[0]})")
            return 0
        time.sleep(1)
        print(f"backupmx: {setup_description('operator')}; event loop of serve: {node.event_loop()}", flush=True)
        figures = []
        # accept
        sampler = Sampler(exe, node.pid, raw_dir / "accept.txt", args.rate, gil=not args.all_threads)
        cpu0 = cpu_seconds(node.pid)
        res = smtp_source(
            node.host,
            node.port,
            messages=args.messages,
            sessions=SESSIONS,
            size_kb=args.size_kb,
            recipient=RECIPIENT,
            timeout=args.timeout,
        )
        held = node.wait_queue_count(args.messages, timeout=60)
        cpu_accept = cpu_seconds(node.pid) - cpu0
        sampler.stop()
        ok = res.ok and held == args.messages
        figures.append(
            [
                "accept",
                f"{args.messages:,}",
                f"{res.elapsed:.1f}",
                f"{1000 * cpu_accept / args.messages:.2f}",
                "ok" if ok else f"INVALID: queue {held}, smtp-source {res.output.strip()[-200:]}",
            ]
        )
        print(
            f"accepted {held:,} of {args.messages:,} in {res.elapsed:.1f}s, "
            f"{1000 * cpu_accept / args.messages:.2f} ms CPU each",
            flush=True,
        )
        # deliver
        time.sleep(3)  # the outage is declared
        sampler = Sampler(exe, node.pid, raw_dir / "deliver.txt", args.rate, gil=not args.all_threads)
        cpu0 = cpu_seconds(node.pid)
        with SmtpSink("127.0.0.1", primary) as sink:
            _first, _all, empty = watch_drain(
                sink, args.messages, node.queue_count, timeout=args.timeout, queue_poll=0.5
            )
            got = sink.wait_messages(args.messages, timeout=5)
        cpu_deliver = cpu_seconds(node.pid) - cpu0
        sampler.stop()
        ok = got == args.messages and not math.isnan(empty)
        figures.append(
            [
                "deliver",
                f"{got:,}",
                f"{empty:.1f}",
                f"{1000 * cpu_deliver / max(got, 1):.2f}",
                "ok" if ok else f"INVALID: sink got {got}",
            ]
        )
        print()
        print(machine_line())
        print(f"load average (1/5/15 min) at start {load_start}, at end {load_average()}")
        print(
            f"\nCPU of backupmx serve (utime + stime) per message, {args.size_kb:g} KB, {SESSIONS} sessions "
            "(sampling by py-spy included):"
        )
        print(table(["phase", "messages", "seconds", "ms CPU / message", "check"], figures))
        for phase in ("accept", "deliver"):
            print(f"\n== {phase} ==")
            print(top_table(raw_dir / f"{phase}.txt", args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
