"""Memory of `backupmx serve` while it drains large messages concurrently (issue 12, "bounded memory on
the delivery side"): N messages of S MiB (default 20 x 50 MiB) are put into the spool while serve is
stopped, serve starts with its primary down, and once its RSS has settled a sink comes up on the
primary's port (the scripted primary, discarding bodies). VmRSS is sampled every 50 ms until the sink
has every message; the figure is the peak (VmHWM) minus the RSS before the drain. Bodies are streamed
from the spool, so growth is buffers, not messages. A run where the sink did not get each message
once, at full size, is INVALID. Repeated (default 3 runs): min/median/max, with the load average.

    .venv/bin/python bench/drain_large.py                  # 20 x 50 MiB, 3 runs (~1 GiB of disk per run)
    .venv/bin/python bench/drain_large.py --messages 5 --size-mb 10 --runs 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` and `tests.support` importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from backupmx.model import Envelope, Recipient
from backupmx.spool.body import BodyBuffer
from backupmx.spool.sqlite import SqliteSpool
from bench.backupmx_node import (
    BackupmxNode,
    BackupmxUnavailable,
    Setup,
    add_setup_options,
    chosen_setup,
    setup_description,
)
from bench.figures import fmt_triple, load_average, machine_line, summary, table
from bench.signals import exit_on_sigterm
from tests.support.ports import free_port
from tests.support.scripted_primary import ScriptedPrimary

MIB = 1024 * 1024


def message_body(size: int, i: int, tmp: Path) -> BodyBuffer:
    head = (
        f"From: <sender@source.test>\r\nTo: <alice@example.test>\r\nSubject: large {i}\r\n"
        f"Message-ID: <drain.{i}.{time.time_ns()}@source.test>\r\n\r\n"
    ).encode()
    line = b".dot-stuffed on the way out " + b"Y" * 968 + b"\r\n"  # 998 octets + CRLF
    buf = BodyBuffer(tmp)
    buf.write(head)
    block = line * 256
    left = size - len(head)
    while left >= len(block):
        buf.write(block)
        left -= len(block)
    buf.write(line * (left // len(line)))
    return buf


async def fill(data_dir: Path, n: int, size: int, tmp: Path) -> list[int]:
    """Put n messages; their sizes (they differ by a few header bytes)."""
    spool = SqliteSpool(data_dir)
    await spool.open()
    try:
        sizes = []
        for i in range(n):
            with message_body(size, i, tmp) as body:
                sizes.append(body.size)
                await spool.put(
                    Envelope(sender="sender@source.test", recipients=(Recipient(f"r{i}@example.test"),)), body
                )
        return sorted(sizes)
    finally:
        await spool.close()


def one_run(
    work: Path, n: int, size: int, timeout: float, *, setup: Setup = "operator", asyncio_loop: bool = False
) -> dict[str, object]:
    port = free_port()
    node = BackupmxNode(
        work / "node",
        domains={"example.test": port},
        delivery={
            "concurrency_initial": n,
            "concurrency_max": n,
            "probe_interval": "1s",
            "retry_min": "1s",
            "retry_max": "2s",
        },
        extra={"dns": {"nameservers": [f"127.0.0.1:{free_port()}"]}},
        setup=setup,
        asyncio_loop=asyncio_loop,
    )
    sizes = asyncio.run(fill(node.data_dir, n, size, work))
    sink = ScriptedPrimary(keep_bodies=False)
    with node:
        node.start()
        time.sleep(3)  # start-up allocations settle; the primary is down, nothing is sent yet
        base = node.memory()["VmRSS"]
        peak_sampled = base
        started = time.perf_counter()
        with sink.running(port):
            deadline = time.monotonic() + timeout
            while len(sink.body_sizes) < n and time.monotonic() < deadline:
                peak_sampled = max(peak_sampled, node.memory()["VmRSS"])
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            hwm = node.memory()["VmHWM"]
            time.sleep(0.5)  # anything more would be a duplicate
            copies = {r for t in sink.delivered() for r in t.recipients}
            ok = (
                len(sink.body_sizes) == n
                and len(copies) == n
                and len(sink.delivered()) == n
                and sorted(sink.body_sizes) == sizes
            )
            why = (
                f"sink: {len(sink.body_sizes)} bodies, {len(copies)} recipients, {len(sink.delivered())} "
                f"accepted, sizes {sorted(sink.body_sizes)} (stored {sizes})"
            )
    shutil.rmtree(work / "node", ignore_errors=True)
    return {
        "messages": n,
        "bytes_each": sizes[0],
        "seconds": elapsed,
        "rss_base_kib": base,
        "rss_peak_sampled_kib": peak_sampled,
        "hwm_kib": hwm,
        "growth_kib": hwm - base,
        "received": len(sink.body_sizes),
        "valid": ok,
        "why": "" if ok else why,
        "loadavg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20)
    ap.add_argument("--size-mb", type=float, default=50)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600)
    add_setup_options(ap)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    exit_on_sigterm()
    setup = chosen_setup(args)
    print(machine_line(), flush=True)
    print(f"backupmx: {setup_description(setup)}", flush=True)
    load_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="bmx-bench-drain-large-"))
    records: list[dict[str, object]] = []
    try:
        for run in range(args.runs):
            try:
                rec = one_run(
                    work,
                    args.messages,
                    int(args.size_mb * MIB),
                    args.timeout,
                    setup=setup,
                    asyncio_loop=args.asyncio_loop,
                )
            except BackupmxUnavailable as e:
                print(f"backupmx: pending ({str(e).splitlines()[0]})")
                return 0
            records.append(rec)
            load = " ".join(f"{x:.1f}" for x in rec["loadavg"])  # type: ignore[attr-defined]
            print(
                f"run {run + 1}: {rec['received']}/{args.messages} in {rec['seconds']:.1f}s, RSS "
                f"{int(rec['rss_base_kib']) / 1024:.0f} MiB -> peak {int(rec['hwm_kib']) / 1024:.0f} MiB "  # type: ignore[call-overload]
                f"(+{int(rec['growth_kib']) / 1024:.0f} MiB), load {load}"  # type: ignore[call-overload]
                f"{'' if rec['valid'] else '  INVALID: ' + str(rec['why'])}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    good = [r for r in records if r["valid"]]
    growth = [int(r["growth_kib"]) / 1024 for r in good]  # type: ignore[call-overload]
    secs = [float(r["seconds"]) for r in good]  # type: ignore[arg-type]
    print()
    print(f"load average (1/5/15 min) at start {load_start}, at end {load_average()}")
    print(
        table(
            ["messages", "valid runs", "RSS growth MiB (min/median/max)", "drain s (min/median/max)"],
            [
                [
                    f"{args.messages} x {args.size_mb:g} MiB",
                    f"{len(good)}/{len(records)}",
                    fmt_triple(growth),
                    fmt_triple(secs, 1),
                ]
            ],
        )
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": records, "growth_mib": summary(growth)}, indent=1))
    return 0 if len(good) == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
