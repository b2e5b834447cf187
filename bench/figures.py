"""Summary statistics and plain-text tables for the benchmark scripts: min/median/max, percentiles,
geometric mean, and the machine description that goes next to every figure. Prints; never judges."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max); NaNs when empty."""
    if not values:
        return (math.nan, math.nan, math.nan)
    return (min(values), statistics.median(values), max(values))


def geomean(values: Sequence[float]) -> float:
    vals = [v for v in values if v > 0 and not math.isnan(v)]
    if not vals:
        return math.nan
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def fmt(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def fmt_triple(values: Sequence[float], digits: int = 0) -> str:
    lo, mid, hi = summary(values)
    return f"{fmt(lo, digits)} / {fmt(mid, digits)} / {fmt(hi, digits)}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded so it also reads well in a terminal."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join([line, sep, *body])


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    try:
        postfix = (
            subprocess.run(
                ["/usr/sbin/postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        postfix = "not installed"
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": postfix,
    }


def fsync_ms(directory: str | None = None, rounds: int = 100) -> tuple[float, float]:
    """(p50, p99) milliseconds of write(4 KiB) + fsync in `directory` (default: the temp dir): what
    one durable commit costs on this disk at best."""
    fd, path = tempfile.mkstemp(dir=directory)
    times = []
    try:
        for _ in range(rounds):
            os.write(fd, b"x" * 4096)
            t = time.perf_counter()
            os.fsync(fd)
            times.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    return percentile(times, 50), percentile(times, 99)


def load_average() -> str:
    """The 1/5/15-minute load average, as `uptime` prints it."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_line() -> str:
    """The machine, its disk's fsync latency, and its load average now (other work on it makes
    figures noisy)."""
    m = machine()
    load = load_average()
    p50, p99 = fsync_ms()
    return (
        f"machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}, "
        f"Python {m['python']}, Postfix {m['postfix']}; fsync 4 KiB p50 {p50:.2f} ms p99 {p99:.2f} ms; "
        f"load average (1/5/15 min) {load}"
    )


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, VmSize... of a live process from /proc/PID/status, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Vm") and line.endswith("kB"):
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0])
    return out
