"""Accept rate of one `backupmx serve` on PostgreSQL against one on SQLite, same run, interleaved
(order alternating per repeat), `--size` KiB messages (default 5) by smtp-source over 30 sessions, the
primary down, run by tests/scenarios/test_multinode_throughput.py's accept_run; prints each pair's rates
and the PostgreSQL/SQLite ratio (issue 14's target: >= 0.8). PostgreSQL as the tests run it
(tests/support/postgres.py: fsync and synchronous_commit on).

    .venv/bin/python bench/pg_vs_sqlite.py --messages 1000 --repeat 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` and `tests` importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from tests.scenarios import test_multinode_throughput as multinode
from tests.support.postgres import PostgresServer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--size", type=float, default=5.0, help="KiB per message")
    args = ap.parse_args()
    multinode.SIZE_KB = args.size  # read by the scenario's load at call time
    work = Path(tempfile.mkdtemp(prefix="bmx-pg-vs-sqlite-"))
    ratios: list[float] = []
    try:
        with PostgresServer() as pg:
            for r in range(args.repeat):
                order = ("sqlite", "postgres") if r % 2 == 0 else ("postgres", "sqlite")
                rates: dict[str, float] = {}
                for backend in order:
                    run = multinode.accept_run(work / f"{r}-{backend}", backend, 1, args.messages, pg)
                    if not run.valid:
                        print(f"INVALID {backend}: {run.detail}", file=sys.stderr)
                        return 1
                    rates[backend] = run.rate
                ratios.append(rates["postgres"] / rates["sqlite"])
                print(
                    f"repeat {r}: sqlite {rates['sqlite']:.0f} msg/s, postgres {rates['postgres']:.0f} msg/s,"
                    f" ratio {ratios[-1]:.2f}  (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"ratio postgres/sqlite: min {min(ratios):.2f} median {statistics.median(ratios):.2f} max {max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
