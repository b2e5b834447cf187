"""Throughput with many nodes: acceptance and drain of 1 and 3 `backupmx serve` nodes on one PostgreSQL
database, with the embedded SQLite spool (1 node) as the reference, on the same machine at the same
moment. A measurement, not a test of speed: it checks only that nothing was lost or doubled, and runs
only when asked (it takes minutes):

    BACKUPMX_BENCH=1 .venv/bin/pytest tests/scenarios/test_multinode_throughput.py -s
    .venv/bin/python -m tests.scenarios.test_multinode_throughput [--quick] [--json FILE]

Load: Postfix's smtp-source (one message per session, 5 KiB), the same total number of client sessions
split over the nodes; the primary is down (nothing listens) while mail is accepted. Drain: smtp-sink
starts on the primary's port; each node's probe (1 s) notices; timed until the sink has every message
and the queue is empty. PostgreSQL runs with fsync and synchronous_commit on (defaults)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
from bench.backupmx_node import BackupmxNode

from tests.support.ports import free_port
from tests.support.postfix import SmtpSink, smtp_source, tools_unavailable_reason
from tests.support.postgres import PostgresServer, unavailable_reason

SIZE_KB = 5
SESSIONS = 30  # client sessions in parallel, in total over the nodes
CELLS = (("sqlite", 1), ("postgres", 1), ("postgres", 3))


@dataclass
class Run:
    backend: str
    nodes: int
    kind: str  # "accept" | "drain"
    messages: int
    seconds: float  # accept: load wall time; drain: primary back -> queue empty
    first: float = math.nan  # drain: primary back -> first message at the sink
    all_in: float = math.nan  # drain: primary back -> every message at the sink
    valid: bool = True
    detail: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


class Cluster:
    """n nodes of `backupmx serve` on one spool (SQLite: one node, its own data dir)."""

    def __init__(self, work: Path, backend: str, n: int, primary_port: int, pg: PostgresServer | None) -> None:
        self.url = pg.create_database() if backend == "postgres" and pg is not None else None
        extra = {"spool": {"url": self.url}} if self.url else {}
        self.nodes = [
            BackupmxNode(
                work / f"n{i}",
                domains={"example.test": primary_port},
                server={"node_name": f"n{i}", "hostname": f"n{i}.backup.test"},
                delivery={"probe_interval": "1s", "probe_timeout": "1s"},
                extra=extra,
            )
            for i in range(1, n + 1)
        ]

    def __enter__(self) -> Cluster:
        for node in self.nodes:
            node.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            try:
                node.stop(timeout=30)
            finally:
                node.kill()

    def load(self, messages: int) -> tuple[float, str]:
        """smtp-source on every node at once; (wall seconds, problems)."""
        per = [
            messages // len(self.nodes) + (1 if i < messages % len(self.nodes) else 0) for i in range(len(self.nodes))
        ]
        problems: list[str] = []

        def one(node: BackupmxNode, count: int) -> None:
            res = smtp_source(
                node.host,
                node.port,
                messages=count,
                sessions=max(1, SESSIONS // len(self.nodes)),
                size_kb=SIZE_KB,
                timeout=600,
            )
            if not res.ok:
                problems.append(res.output[-300:])

        threads = [threading.Thread(target=one, args=(node, c)) for node, c in zip(self.nodes, per, strict=True)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - started, "; ".join(problems)

    def queue_count(self) -> int:
        """Pending messages, read from the spool itself (as `backupmx queue count` does)."""
        from backupmx.spool import Spool
        from backupmx.spool.postgres import PostgresSpool
        from backupmx.spool.sqlite import SqliteSpool

        async def count(spool: Spool) -> int:
            await spool.open()
            try:
                return await spool.count_pending()
            finally:
                await spool.close()

        if self.url:
            return asyncio.run(count(PostgresSpool(self.url, node="bench")))
        return sum(asyncio.run(count(SqliteSpool(node.data_dir))) for node in self.nodes)


def accept_run(work: Path, backend: str, n: int, messages: int, pg: PostgresServer | None) -> Run:
    with Cluster(work, backend, n, free_port(), pg) as cluster:
        seconds, problems = cluster.load(messages)
        held = cluster.queue_count()
        ok = not problems and held == messages
        return Run(
            backend,
            n,
            "accept",
            messages,
            seconds,
            valid=ok,
            detail="" if ok else f"held {held} of {messages} {problems}",
        )


def drain_run(work: Path, backend: str, n: int, messages: int, pg: PostgresServer | None) -> Run:
    primary_port = free_port()
    with Cluster(work, backend, n, primary_port, pg) as cluster:
        _, problems = cluster.load(messages)
        held = cluster.queue_count()
        if problems or held != messages:
            return Run(backend, n, "drain", messages, 0, valid=False, detail=f"held {held} of {messages} {problems}")
        time.sleep(3)  # the outage is declared, as in a real one
        with SmtpSink("127.0.0.1", primary_port) as sink:
            t0 = time.perf_counter()
            first = all_in = empty = math.nan
            deadline = time.monotonic() + 600
            next_poll = 0.0
            while time.monotonic() < deadline:
                now = time.perf_counter() - t0
                got = sink.messages
                if got and math.isnan(first):
                    first = now
                if got >= messages and math.isnan(all_in):
                    all_in = now
                if now >= next_poll:
                    if cluster.queue_count() == 0:
                        empty = time.perf_counter() - t0
                        break
                    next_poll = time.perf_counter() - t0 + 0.25
                time.sleep(0.02)
            got = sink.wait_messages(messages, timeout=5)
        ok = got == messages and not math.isnan(empty)
        return Run(
            backend, n, "drain", messages, empty, first, all_in, ok, "" if ok else f"sink got {got} of {messages}"
        )


def measure(*, accept_messages: int, drain_messages: int, repeats: int) -> list[Run]:
    runs: list[Run] = []
    work = Path(tempfile.mkdtemp(prefix="bmx-multinode-"))
    try:
        with PostgresServer() as pg:
            for r in range(repeats):
                cells = CELLS if r % 2 == 0 else tuple(reversed(CELLS))  # order alternates between repeats
                for backend, n in cells:
                    run = accept_run(work / f"a{r}-{backend}{n}", backend, n, accept_messages, pg)
                    print(f"accept {backend} x{n}: {run.rate:.0f} msg/s {run.detail}", file=sys.stderr, flush=True)
                    runs.append(run)
            for backend, n in CELLS:
                run = drain_run(work / f"d-{backend}{n}", backend, n, drain_messages, pg)
                print(f"drain {backend} x{n}: {run.rate:.0f} msg/s {run.detail}", file=sys.stderr, flush=True)
                runs.append(run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return runs


def report(runs: list[Run]) -> str:
    lines = [
        "| spool | nodes | accept msg/s (min / median / max) | drain: first at primary | all at primary"
        " | queue empty | drain msg/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, n in CELLS:
        acc = [r.rate for r in runs if (r.backend, r.nodes, r.kind) == (backend, n, "accept") and r.valid]
        dr = [r for r in runs if (r.backend, r.nodes, r.kind) == (backend, n, "drain")]
        a = f"{min(acc):.0f} / {statistics.median(acc):.0f} / {max(acc):.0f}" if acc else "invalid"
        d = dr[0] if dr else None
        drain = (
            f"{d.first:.2f} s | {d.all_in:.2f} s | {d.seconds:.2f} s | {d.rate:.0f}"
            if d and d.valid
            else "invalid | | |"
        )
        lines.append(f"| {'PostgreSQL' if backend == 'postgres' else 'SQLite'} | {n} | {a} | {drain} |")
    return "\n".join(lines)


@pytest.mark.slow
def test_throughput_of_one_and_three_nodes() -> None:
    if not os.environ.get("BACKUPMX_BENCH"):
        pytest.skip("a measurement of minutes: set BACKUPMX_BENCH=1 to run it")
    for reason in (unavailable_reason(), tools_unavailable_reason()):
        if reason:
            pytest.skip(reason)
    runs = measure(accept_messages=1000, drain_messages=2000, repeats=1)
    print("\n" + report(runs))
    assert all(r.valid for r in runs), [r for r in runs if not r.valid]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 accepted / 2,000 drained, one repeat")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    for reason in (unavailable_reason(), tools_unavailable_reason()):
        if reason:
            print(f"cannot run: {reason}", file=sys.stderr)
            return 2
    if args.quick:
        runs = measure(accept_messages=1000, drain_messages=2000, repeats=1)
    else:
        runs = measure(accept_messages=3000, drain_messages=10000, repeats=3)
    print(report(runs))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"rate": r.rate} for r in runs], indent=1))
    return 0 if all(r.valid for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
