"""Memory of `backupmx serve` while it receives a large message (default 50 MiB, sent whole over one
session): VmRSS and VmHWM of the serve process from /proc/PID/status before and after each message, and
the growth of the peak over the starting RSS. A streaming server grows by its buffers, not by the
message. Each message must be in the queue afterwards (`backupmx queue count`), or the run is invalid.
With --drain, the primary then comes back (smtp-sink) and VmRSS is sampled every 50 ms until the queue
is empty: the growth over the RSS before the drain is what delivering large messages costs.
Operator's setup by default (recipient file, admin listener, mail log on stderr); --lab-setup: the former.

    .venv/bin/python bench/large_message.py                 # one 50 MiB message, then two more
    .venv/bin/python bench/large_message.py --count 20 --drain   # the drain target: 20 x 50 MiB
    .venv/bin/python bench/large_message.py --size-mb 20 --count 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import smtplib
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` and `tests.support` importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from bench.backupmx_node import BackupmxNode, BackupmxUnavailable, add_setup_options, chosen_setup, setup_description
from bench.figures import load_average, machine, machine_line, table
from bench.signals import exit_on_sigterm
from tests.support.ports import free_port
from tests.support.postfix import SmtpSink, tools_unavailable_reason


def make_message(size: int, i: int) -> bytes:
    head = (
        f"From: <sender@source.test>\r\nTo: <alice@example.test>\r\nSubject: large {i}\r\n"
        f"Message-ID: <large.{i}.{time.time_ns()}@source.test>\r\n\r\n"
    ).encode()
    line = b"Y" * 998 + b"\r\n"  # the longest line RFC 5321 allows
    return head + line * ((size - len(head)) // len(line))


def drain_rss(node: BackupmxNode, primary: int, count: int, timeout: float) -> dict[str, float]:
    """The primary comes back; VmRSS every 50 ms until the queue is empty (or `timeout`)."""
    time.sleep(3)  # the outage is declared, as in a real one
    base = node.memory()["VmRSS"]
    peak = base
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    left = count
    next_poll = 0.0
    with SmtpSink("127.0.0.1", primary) as sink:
        while time.monotonic() < deadline:
            peak = max(peak, node.memory()["VmRSS"])
            if time.monotonic() >= next_poll:
                left = node.queue_count()
                if left == 0:
                    break
                next_poll = time.monotonic() + 0.5
            time.sleep(0.05)
        delivered = sink.wait_messages(count, timeout=5)
    return {
        "seconds": time.perf_counter() - started,
        "rss_before_kib": base,
        "rss_peak_kib": peak,
        "delivered": delivered,
        "queue_after": left,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=50, help="message size in MiB (default %(default)s)")
    ap.add_argument("--count", type=int, default=3, help="messages, one after the other (default %(default)s)")
    ap.add_argument("--drain", action="store_true", help="then deliver them to smtp-sink, sampling RSS")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds for the drain")
    add_setup_options(ap)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    exit_on_sigterm()
    setup = chosen_setup(args)
    if args.drain and tools_unavailable_reason():
        print(f"cannot run: {tools_unavailable_reason()}", file=sys.stderr)
        return 2
    load_start = load_average()
    drain: dict[str, float] = {}
    loop = "-"
    size = int(args.size_mb * 1024 * 1024)
    print(machine_line(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bmx-bench-large-"))
    rows = []
    records = []
    try:
        primary = free_port()
        node = BackupmxNode(
            work / "node",
            domains={"example.test": primary},
            server={"max_message_size": size + 4 * 1024 * 1024},
            delivery={"probe_interval": "1s"},
            setup=setup,
            recipients=["alice@example.test"],
            asyncio_loop=args.asyncio_loop,
        )
        with node:
            try:
                node.start()
            except BackupmxUnavailable as e:
                print(f"backupmx: pending ({str(e).splitlines()[0]})")
                return 0
            time.sleep(1)  # let start-up allocations settle
            loop = node.event_loop()
            base = node.memory()
            for i in range(args.count):
                before = node.memory()
                msg = make_message(size, i)
                started = time.perf_counter()
                with smtplib.SMTP(node.host, node.port, timeout=300) as c:
                    c.ehlo("source.test")
                    c.sendmail("sender@source.test", ["alice@example.test"], msg)
                elapsed = time.perf_counter() - started
                after = node.memory()
                queued = node.wait_queue_count(i + 1, timeout=60)
                rec = {
                    "message": i + 1,
                    "bytes": len(msg),
                    "seconds": elapsed,
                    "rss_before_kib": before["VmRSS"],
                    "rss_after_kib": after["VmRSS"],
                    "hwm_after_kib": after["VmHWM"],
                    "peak_growth_kib": after["VmHWM"] - base["VmRSS"],
                    "queued": queued,
                    "valid": queued == i + 1,
                }
                records.append(rec)
                mib = 1024
                rows.append(
                    [
                        str(i + 1),
                        f"{len(msg) / 2**20:.1f} MiB",
                        f"{elapsed:.2f}",
                        f"{before['VmRSS'] / mib:.1f}",
                        f"{after['VmRSS'] / mib:.1f}",
                        f"{after['VmHWM'] / mib:.1f}",
                        f"{rec['peak_growth_kib'] / mib:+.1f}",
                        "ok" if rec["valid"] else f"INVALID: queue count {queued}",
                    ]
                )
                print(
                    f"message {i + 1}: {elapsed:.2f}s, VmRSS {before['VmRSS'] / mib:.1f} -> "
                    f"{after['VmRSS'] / mib:.1f} MiB, VmHWM {after['VmHWM'] / mib:.1f} MiB",
                    flush=True,
                )
            if args.drain:
                drain = drain_rss(node, primary, args.count, args.timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(machine_line())
    print(f"\nbackupmx serve memory while receiving {args.count} x {args.size_mb:g} MiB (MiB):")
    print(
        table(
            ["msg", "size", "seconds", "VmRSS before", "VmRSS after", "VmHWM after", "peak - start RSS", "check"], rows
        )
    )
    if drain:
        got, want = int(drain["delivered"]), args.count
        print(
            f"\ndrain of {want} x {args.size_mb:g} MiB to smtp-sink: {drain['seconds']:.1f}s, VmRSS before "
            f"{drain['rss_before_kib'] / 1024:.1f} MiB, peak sampled {drain['rss_peak_kib'] / 1024:.1f} MiB, "
            f"growth {(drain['rss_peak_kib'] - drain['rss_before_kib']) / 1024:+.1f} MiB; "
            f"{'ok' if got == want and drain['queue_after'] == 0 else f'INVALID: sink got {got} of {want}'}"
        )
    print(f"load average (1/5/15 min) at start {load_start}, at end {load_average()}")
    print(f"backupmx: {setup_description(setup)}; event loop of serve: {loop}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "records": records, "drain": drain}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
