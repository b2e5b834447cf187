"""Loopback ports for test peers: a free port (bind port 0, read it, close), and a bounded wait for an
SMTP greeting. A port from `free_port` is free when returned, not reserved: a peer that fails to bind it
must retry with another one (PostfixInstance does)."""

from __future__ import annotations

import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now (also good as a "dead" primary)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def smtp_banner(host: str, port: int, *, timeout: float = 2.0) -> bytes | None:
    """The first line the server sends, or None when nothing answers. Says QUIT when it got one."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            data = b""
            while b"\n" not in data and len(data) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            if data:
                try:
                    s.sendall(b"QUIT\r\n")
                except OSError:
                    pass
            return data.split(b"\n", 1)[0].rstrip(b"\r") or None
    except OSError:
        return None


def wait_for_smtp(host: str, port: int, *, timeout: float = 15.0, interval: float = 0.05) -> bytes:
    """Wait until `host:port` greets with 220; returns the greeting. Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    last: bytes | None = None
    while True:
        last = smtp_banner(host, port, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
        if last is not None and last.startswith(b"220"):
            return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no 220 greeting on {host}:{port} within {timeout:g}s (last: {last!r})")
        time.sleep(interval)


def is_listening(host: str, port: int, *, timeout: float = 0.5) -> bool:
    """True when a TCP connect to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
