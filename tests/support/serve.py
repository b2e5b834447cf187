"""Runs the real `backupmx serve` as a subprocess for scenario tests: writes a config, starts it, waits
until the SMTP port answers 220, and can SIGKILL, SIGTERM and restart it. Also runs CLI commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.ports import free_port, wait_for_smtp
from tests.support.toml_config import render_toml

REPO = Path(__file__).resolve().parents[2]


class ServeProcess:
    """One `backupmx serve` node with its own data directory."""

    def __init__(
        self,
        workdir: Path,
        *,
        domains: list[dict[str, Any]] | None = None,
        server: dict[str, Any] | None = None,
        delivery: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        admin: bool = False,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = "127.0.0.1"
        self.data_dir = workdir / "data"
        self.admin_port = free_port() if admin else None
        sections: dict[str, Any] = {
            "server": {
                "hostname": "backup.test",
                "listen": [f"{self.host}:{self.port}"],
                "data_dir": str(self.data_dir),
                "min_free_disk": "1MB",
                **(server or {}),
            },
            "domains": domains
            if domains is not None
            else [{"name": "example.test", "primary": [f"127.0.0.1:{free_port()}"], "recipients": "any"}],
            "delivery": {"retry_min": "1s", "retry_max": "5s", "probe_interval": "1s", **(delivery or {})},
            # an empty listen turns the admin listener off
            "admin": {"listen": f"127.0.0.1:{self.admin_port}" if admin else ""},
        }
        for k, v in (extra or {}).items():
            sections[k] = v
        self.config_path = workdir / "backupmx.toml"
        self.config_path.write_text(render_toml(sections))
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "serve.log"
        self.starts = 0

    def start(self, *, env: dict[str, str] | None = None, wait: bool = True) -> ServeProcess:
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child)
        log.write(f"--- start {self.starts}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backupmx.cli", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            env={**self.env, **(env or {})},
            cwd=str(self.workdir),
        )
        log.close()
        if wait:
            try:
                wait_for_smtp(self.host, self.port)
            except TimeoutError:
                self.kill()
                raise AssertionError(f"serve did not start:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cli(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "backupmx.cli", *args]
        if args and args[0] in ("queue", "recipients", "status", "drill", "spool", "access", "continuity"):
            argv += ["--config", str(self.config_path)]
        res = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout, cwd=str(self.workdir))
        if check and res.returncode != 0:
            raise AssertionError(f"backupmx {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def queue_count(self) -> int:
        return int(self.cli("queue", "count").stdout.strip())

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
