"""Runs the real `backupmx serve` for the benchmarks: writes a TOML config (one protected domain,
example.test, whose primary is a loopback port) in the operator's setup (a recipient list, the admin
listener with a token file, the mail log on stderr) or the lab setup, starts `.venv/bin/backupmx serve
--config FILE` in its own session, waits until its port greets 220, reads its memory from /proc, runs
`backupmx queue ...`, and always stops it (SIGTERM, then SIGKILL). BackupmxUnavailable: serve did not start."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from bench.figures import proc_status
from tests.support import toml_config
from tests.support.ports import free_port, wait_for_smtp
from tests.support.watchdog import Watchdog

REPO = Path(__file__).resolve().parents[1]


def backupmx_command() -> list[str]:
    exe = REPO / ".venv" / "bin" / "backupmx"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "backupmx.cli"]


Setup = Literal["operator", "lab"]
SETUPS: tuple[Setup, ...] = ("operator", "lab")
OTHER_RECIPIENTS = 5000  # addresses in the operator's recipient list besides those the load sends to


def setup_description(setup: Setup) -> str:
    """What a figure's config was, for the line printed next to it."""
    if setup == "operator":
        return (
            f"operator setup: recipients from a file (the load's addresses + {OTHER_RECIPIENTS:,} others), "
            "admin listener on 127.0.0.1 with a token file, mail log on stderr redirected by the parent "
            "to a file (as journald takes it), [dns] to a loopback port where nothing listens, "
            "spool kept across runs"
        )
    return (
        'lab setup: recipients = "any", no admin listener, mail log to its own file, [dns] to a loopback '
        "port where nothing listens, empty spool before each run"
    )


def add_loop_option(ap: argparse.ArgumentParser) -> None:
    """--asyncio-loop, the same in every bench that starts serve."""
    ap.add_argument(
        "--asyncio-loop",
        action="store_true",
        help="make serve use asyncio's own event loop (uvloop blocked): the install without uvloop",
    )


def add_setup_options(ap: argparse.ArgumentParser, lab_also: str = "") -> None:
    """--asyncio-loop and --lab-setup; `lab_also` ends the latter's help with what that bench's lab
    setup does besides (", a fresh server ... for every run")."""
    add_loop_option(ap)
    ap.add_argument(
        "--lab-setup",
        action="store_true",
        help='the former setup: recipients "any", no admin listener, mail log in a file' + lab_also,
    )


def chosen_setup(args: argparse.Namespace) -> Setup:
    """The setup --lab-setup picked (operator unless it was given)."""
    return SETUPS[1] if args.lab_setup else SETUPS[0]


def write_recipient_file(path: Path, domains: Sequence[str], addresses: Sequence[str]) -> int:
    """The operator's list: the addresses the load sends to and OTHER_RECIPIENTS others spread over
    the domains. Returns how many lines it holds."""
    lines = list(dict.fromkeys(a.lower() for a in addresses))
    lines += [f"user{i:05d}@{domains[i % len(domains)]}" for i in range(OTHER_RECIPIENTS)]
    path.write_text("# recipients of the bench's domains, one a line\n" + "\n".join(lines) + "\n")
    return len(lines)


class BackupmxUnavailable(RuntimeError):
    """`backupmx serve` did not come up (not written yet, or broken): its log says why."""


def render_toml(sections: Mapping[str, Any]) -> str:
    text = toml_config.render_toml(sections)
    tomllib.loads(text)  # what we write must parse
    return text


class BackupmxNode:
    """One `backupmx serve` with its own data directory under `workdir`.

    domains: {name: primary port on 127.0.0.1}.
    setup "lab": recipients = "any" for each, no admin listener, the mail log in its own file.
    setup "operator": a recipient file (`recipients`, the addresses the load sends to, plus
    OTHER_RECIPIENTS others), the admin listener on a loopback port with a token file, the mail log
    on stderr (which start() sends with the diagnostic log to serve.log, as journald would take it).
    Both: [dns] nameservers is a loopback port where nothing listens, so no lookup leaves the machine.
    server/delivery/extra: added to or overriding the generated sections.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        domains: Mapping[str, int],
        port: int | None = None,
        server: Mapping[str, Any] | None = None,
        delivery: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        setup: Setup = "lab",
        recipients: Sequence[str] = (),
        asyncio_loop: bool = False,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.data_dir = workdir / "data"
        self.config_path = workdir / "backupmx.toml"
        self.log_path = workdir / "serve.log"
        sections: dict[str, Any] = {
            "server": {
                "hostname": "backup.test",
                "listen": [f"{self.host}:{self.port}"],
                "data_dir": str(self.data_dir),
                # one client address runs all the load: lift the per-IP cap as Postfix does for
                # $mynetworks (smtpd_client_event_limit_exceptions)
                "max_connections_per_ip": 1000,
                "max_connections": 1000,
                **(server or {}),
            },
            "domains": [
                {"name": name, "primary": [f"127.0.0.1:{p}"], "recipients": "any"} for name, p in domains.items()
            ],
            "delivery": dict(delivery or {}),
            "admin": {"listen": ""},
            "log": {"maillog": str(workdir / "mail.log")},
            "dns": {"nameservers": [f"127.0.0.1:{free_port()}"]},
        }
        self.setup: Setup = setup
        self.admin_port: int | None = None
        if setup == "operator":
            rfile = workdir / "recipients.txt"
            write_recipient_file(rfile, list(domains), recipients)
            for d in sections["domains"]:
                d["recipients"] = f"file:{rfile}"
            token = workdir / "admin.token"
            token.write_text(os.urandom(24).hex() + "\n")
            token.chmod(0o600)
            self.admin_port = free_port()
            sections["admin"] = {"listen": f"127.0.0.1:{self.admin_port}", "token_file": str(token)}
            del sections["log"]  # the default: the mail log on stderr
        if not sections["delivery"]:
            del sections["delivery"]
        for k, v in (extra or {}).items():
            sections[k] = v
        self.config_path.write_text(render_toml(sections))
        self.proc: subprocess.Popen[bytes] | None = None
        self._watchdog: Watchdog | None = None
        self.env: dict[str, str] | None = None
        if asyncio_loop:
            # the default install without uvloop, measured in the same venv: serve imports uvloop and
            # falls back to asyncio's loop on ImportError, so a package that raises it comes first
            shim = workdir / "no-uvloop" / "uvloop"
            shim.mkdir(parents=True, exist_ok=True)
            (shim / "__init__.py").write_text('raise ImportError("uvloop blocked by the bench (--asyncio-loop)")\n')
            path = os.environ.get("PYTHONPATH")
            self.env = {**os.environ, "PYTHONPATH": str(shim.parent) + (os.pathsep + path if path else "")}

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self, *, timeout: float = 60.0) -> float:
        """Start and wait for the 220 greeting; returns the seconds it took."""
        if self.proc is not None and self.proc.poll() is None:
            return 0.0
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*backupmx_command(), "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=str(self.workdir),
                start_new_session=True,
                env=self.env,
            )
        # if this script dies (SIGKILL), serve dies too
        self._watchdog = Watchdog('kill -9 -- "-$1"', str(self.proc.pid))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BackupmxUnavailable(
                    f"backupmx serve exited {self.proc.returncode}: {self.last_log_line()}\n{self.log_tail()}"
                )
            try:
                wait_for_smtp(
                    self.host, self.port, timeout=min(1.0, max(0.05, deadline - time.monotonic())), interval=0.02
                )
                return time.perf_counter() - started
            except TimeoutError:
                if time.monotonic() >= deadline:
                    self.kill()
                    raise BackupmxUnavailable(
                        f"backupmx serve gave no 220 within {timeout:g}s: {self.last_log_line()}\n{self.log_tail()}"
                    ) from None

    def stop(self, *, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful), SIGKILL after `timeout`. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._disarm()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._disarm()

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.disarm()
            self._watchdog = None

    def reset(self) -> None:
        """Stop, throw the spool away, start again: an empty queue for the next run."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start()

    def __enter__(self) -> BackupmxNode:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop(timeout=30)
        finally:
            self.kill()

    # -- observation -----------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        assert self.proc is not None and self.proc.poll() is None, "serve is not running"
        return self.proc.pid

    def memory(self) -> dict[str, int]:
        """VmRSS/VmHWM/... of the serve process, KiB."""
        return proc_status(self.pid)

    def event_loop(self) -> str:
        """Which event loop the running serve uses: uvloop when its extension is mapped into the process
        (serve uses uvloop whenever it imports), else asyncio's own."""
        try:
            maps = Path(f"/proc/{self.pid}/maps").read_text()
        except OSError:
            return "unknown"
        return "uvloop" if "/uvloop/" in maps else "asyncio (no uvloop)"

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def last_log_line(self) -> str:
        lines = [ln for ln in self.log_tail().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else "(no output)"

    def cli(self, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        """`backupmx <args> --config FILE`."""
        res = subprocess.run(
            [*backupmx_command(), *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(self.workdir),
        )
        if res.returncode != 0:
            raise RuntimeError(f"backupmx {' '.join(args)} exited {res.returncode}: {res.stderr[-2000:]}")
        return res

    def queue_count(self) -> int:
        return int(self.cli("queue", "count").stdout.strip())

    def wait_queue_count(self, count: int, *, timeout: float = 60.0, interval: float = 0.2) -> int:
        deadline = time.monotonic() + timeout
        n = self.queue_count()
        while n != count and time.monotonic() < deadline:
            time.sleep(interval)
            n = self.queue_count()
        return n
