"""The cost of one mail-log line on stderr (issue 14): a child process writes N "delivered" lines with
the mail log's own code, its stderr redirected by us to a file, then to a pipe read by another process
(as journald takes it). Figures are the child's CPU (user + system: the write(2) per line is system
time) and wall time per line, for: formatting only, the line written and flushed (today: one write(2)
a line), and the same lines block-buffered (one write(2) per 64 KiB, what a buffered writer would do).

    .venv/bin/python bench/maillog_cost.py            # 200,000 lines, 3 repeats
    .venv/bin/python bench/maillog_cost.py --lines 50000 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, sys, time
from backupmx.maillog import MailLog, _StreamSink
n, mode, out_fd = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
log = MailLog()
if mode == "buffered":  # the same lines, one write(2) per 64 KiB instead of one a line
    stream = open(2, "w", buffering=65536, closefd=False)
    class NoFlush(_StreamSink):
        def write(self, data):
            self.stream.write(data)
    log._sink = NoFlush(stream)
fields = dict(to="<alice@example.test>", relay="127.0.0.1:2525", delay="12.3", attempts=1, dsn="2.0.0",
              reply="250 2.0.0 Ok: queued as 4ZxQ1b2c3d")
c0, w0 = time.process_time(), time.perf_counter()
if mode == "format":
    for i in range(n):
        log.format("delivered", {"queue_id": "4ZxQ1b2c3dAB", **fields}, time.time())
else:
    for i in range(n):
        log.event("delivered", "4ZxQ1b2c3dAB", **fields)
    if mode == "buffered":
        stream.flush()
c1, w1 = time.process_time(), time.perf_counter()
os.write(out_fd, json.dumps({"cpu": c1 - c0, "wall": w1 - w0}).encode())
"""


def run(lines: int, mode: str, target: str) -> dict[str, float]:
    r, w = os.pipe()
    with tempfile.TemporaryFile() as f:
        if target == "file":
            err: object = f
            reader = None
        else:  # a pipe with a reader that takes everything, as journald does
            reader = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
            err = reader.stdin
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(lines), mode, str(w)],
            stderr=err,  # type: ignore[arg-type]
            pass_fds=(w,),
            env={**os.environ, "PYTHONUNBUFFERED": "0"},
        )
        child.wait(600)
        os.close(w)
        out = os.read(r, 4096)
        os.close(r)
        if reader is not None:
            assert reader.stdin is not None
            reader.stdin.close()
            reader.wait(60)
        if child.returncode != 0:
            raise SystemExit(f"child failed ({mode}, {target})")
        return dict(json.loads(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    rows: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.repeat):  # interleaved, so that the machine's drift hits every cell
        for target in ("file", "pipe"):
            for mode in ("format", "flushed", "buffered"):
                rows.setdefault(f"{target} {mode}", []).append(run(args.lines, mode, target))
    load1 = os.getloadavg()
    print(
        f"{args.lines:,} lines x {args.repeat} repeats; load average at start "
        f"{' / '.join(f'{x:.2f}' for x in load0)}, at end {' / '.join(f'{x:.2f}' for x in load1)}"
    )
    print("| stderr to | line | CPU µs a line (min / median / max) | wall µs a line (min / median / max) |")
    print("|---|---|---|---|")
    for key, runs in rows.items():
        target, mode = key.split()
        cpu = sorted(r["cpu"] / args.lines * 1e6 for r in runs)
        wall = sorted(r["wall"] / args.lines * 1e6 for r in runs)
        print(
            f"| {target} | {mode} | {cpu[0]:.2f} / {statistics.median(cpu):.2f} / {cpu[-1]:.2f} "
            f"| {wall[0]:.2f} / {statistics.median(wall):.2f} / {wall[-1]:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
