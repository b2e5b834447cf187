"""The added cost per message of the edge checks at the final dot: a real `backupmx serve` without a filter,
then with `[filter] rspamd` (Debian's rspamd, started on loopback by tests/support/rspamd.py), each taking
N messages one after another (one SMTP session each, sequential, so the figure is latency, not throughput).
Prints min / median / max of the time from MAIL FROM to the 250 after the final dot, the median's
difference to the plain run, and the load average before and after. Prints figures; never passes or fails.

    .venv/bin/python bench/edge_cost.py            # 200 messages per configuration
    .venv/bin/python bench/edge_cost.py -n 50
"""

from __future__ import annotations

import argparse
import os
import smtplib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` and `tests.support` importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from tests.support.ports import free_port
from tests.support.rspamd import Rspamd
from tests.support.serve import ServeProcess

BODY = (b"From: Sam <s@sender.test>\r\nTo: alice@ours.test\r\nSubject: figures\r\n"
        b"Message-ID: <%d@sender.test>\r\nDate: Sun, 06 Dec 2026 03:00:00 +0000\r\n\r\n"
        + b"The quarterly figures are attached below, as discussed on the phone.\r\n" * 60)


def node(workdir: Path, extra: dict[str, object]) -> ServeProcess:
    return ServeProcess(workdir, domains=[
        {"name": "ours.test", "primary": [f"127.0.0.1:{free_port()}"], "recipients": ["alice"]}],
        extra={"dns": {"nameservers": [f"127.0.0.1:{free_port()}"], "timeout": "1s"}, **extra})


def run(serve: ServeProcess, n: int) -> list[float]:
    times = []
    for i in range(n):
        with smtplib.SMTP("127.0.0.1", serve.port, local_hostname="client.test", timeout=30) as s:
            t = time.perf_counter()
            s.sendmail("s@sender.test", ["alice@ours.test"], BODY % i)
            times.append(time.perf_counter() - t)
    return times


def line(name: str, times: list[float], base: float | None) -> str:
    ms = sorted(t * 1000 for t in times)
    med = statistics.median(ms)
    extra = "" if base is None else f"  (+{med - base:.2f} ms per message)"
    return f"{name:22s} min {ms[0]:7.2f}  median {med:7.2f}  max {ms[-1]:7.2f} ms{extra}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200, help="messages per configuration (default 200)")
    args = ap.parse_args()
    n = max(5, min(args.n, 5000))
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"{n} messages of {len(BODY % 0)} bytes per configuration, sequential")
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        root = Path(tmp)
        cases: list[tuple[str, Callable[[], dict[str, object]]]] = [("plain", lambda: {})]
        rspamd: Rspamd | None = None
        if Rspamd.available():
            rspamd = Rspamd(root / "rspamd").start()
            url = rspamd.url
            cases.append(("rspamd", lambda: {"filter": {"rspamd": url}}))
        else:
            print("rspamd: not installed (Debian package rspamd); skipped")
        try:
            base = None
            for name, extra in cases:
                with node(root / name, extra()) as serve:
                    serve.start()
                    run(serve, 5)  # warm-up: imports, first connections
                    times = run(serve, n)
                print(line(name, times, base))
                if base is None:
                    base = statistics.median(t * 1000 for t in times)
        finally:
            if rspamd is not None:
                rspamd.stop()
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
