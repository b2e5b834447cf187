"""The added cost per message of the edge checks: a real `backupmx serve` without them, with `[policy] spf`, with
spf + dkim + dmarc (messages signed by dkimpy, key and records on the tests' DNS server, tests/support/
dnsserver.py), and with `[filter] rspamd` (Debian's rspamd, started on loopback by tests/support/rspamd.py), each taking
N messages one after another (one SMTP session each, sequential, so the figure is latency, not throughput).
Prints min / median / max of the time from MAIL FROM to the 250 after the final dot, the median's
difference to the plain run, and the load average before and after. Prints figures; never passes or fails.

    .venv/bin/python bench/edge_cost.py            # 200 messages per configuration
    .venv/bin/python bench/edge_cost.py -n 50
"""

from __future__ import annotations

import argparse
import contextlib
import os
import smtplib
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` and `tests.support` importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from tests.support.dnsserver import DnsServer
from tests.support.ports import free_port
from tests.support.rsa_key import new_rsa_key
from tests.support.rspamd import Rspamd
from tests.support.serve import ServeProcess

BODY = (
    b"From: Sam <s@sender.test>\r\nTo: alice@ours.test\r\nSubject: figures\r\n"
    b"Message-ID: <%d@sender.test>\r\nDate: Sun, 06 Dec 2026 03:00:00 +0000\r\n\r\n"
    + b"The quarterly figures are attached below, as discussed on the phone.\r\n"
    * 60
)


def node(workdir: Path, extra: dict[str, object], nameserver: str) -> ServeProcess:
    return ServeProcess(
        workdir,
        domains=[{"name": "ours.test", "primary": [f"127.0.0.1:{free_port()}"], "recipients": ["alice"]}],
        extra={"dns": {"nameservers": [nameserver], "timeout": "1s"}, **extra},
    )


def dkim_key(tmp: Path) -> tuple[bytes, str]:
    key = tmp / "dkim.pem"
    public = new_rsa_key(key, 2048)
    return key.read_bytes(), public


def signed(i: int, key: bytes | None) -> bytes:
    body = BODY % i
    if key is None:
        return body
    import dkim

    return bytes(dkim.sign(body, b"sel", b"sender.test", key, include_headers=[b"from", b"to", b"subject"])) + body


def run(serve: ServeProcess, n: int, key: bytes | None = None) -> list[float]:
    times = []
    for i in range(n):
        msg = signed(i, key)  # signed before the clock starts: the sender's cost is not ours
        with smtplib.SMTP("127.0.0.1", serve.port, local_hostname="client.test", timeout=30) as s:
            t = time.perf_counter()
            s.sendmail("s@sender.test", ["alice@ours.test"], msg)
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
    print(
        f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; "
        f"{n} messages of {len(BODY % 0)} bytes per configuration, sequential"
    )
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        key, public = dkim_key(root)
        pub = '" "'.join(public[i : i + 200] for i in range(0, len(public), 200))  # TXT strings of 255 at most
        dnsd = stack.enter_context(
            DnsServer(
                {
                    "sender.test": {
                        "@": {"TXT": '"v=spf1 ip4:127.0.0.0/8 -all"'},
                        "sel._domainkey": {"TXT": f'"v=DKIM1; k=rsa; p={pub}"'},
                        "_dmarc": {"TXT": '"v=DMARC1; p=reject"'},
                    }
                }
            )
        )
        cases: list[tuple[str, dict[str, object], bytes | None]] = [
            ("plain", {}, None),
            ("spf", {"policy": {"spf": True}}, None),
            ("spf+dkim+dmarc", {"policy": {"spf": True, "dkim": True, "dmarc": True}}, key),
        ]
        if Rspamd.available():
            rspamd = stack.enter_context(Rspamd(root / "rspamd"))
            cases.append(("rspamd", {"filter": {"rspamd": rspamd.url}}, None))
        else:
            print("rspamd: not installed (Debian package rspamd); skipped")
        base = None
        for name, extra, signing in cases:
            with node(root / name, extra, dnsd.nameserver) as serve:
                serve.start()
                run(serve, 5, signing)  # warm-up: imports, first connections
                times = run(serve, n, signing)
            print(line(name, times, base))
            if base is None:
                base = statistics.median(t * 1000 for t in times)
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
