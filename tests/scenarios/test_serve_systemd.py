"""The real `backupmx serve` under a service manager's NOTIFY_SOCKET (a datagram socket this test opens,
as systemd does for `Type=notify`): READY=1 arrives only once the SMTP, admin and emergency-inbox
listeners all accept connections, WATCHDOG=1 keeps coming while it runs, STOPPING=1 comes on SIGTERM."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ports import free_port, smtp_banner
from tests.support.serve import ServeProcess

RECV_TIMEOUT = 30.0


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """An abstract-namespace datagram socket (no path length limit, nothing left on disk)."""
    name = f"backupmx-test-{os.getpid()}-{os.urandom(4).hex()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(RECV_TIMEOUT)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def next_states(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.partition("=")[::2] for line in data.split("\n") if line)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_ready_only_once_every_listener_is_bound(tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    inbox_port = free_port()
    node = ServeProcess(
        tmp_path / "node",
        admin=True,
        extra={
            "dns": {"nameservers": [f"127.0.0.1:{free_port()}"]},
            "continuity": {"enabled": True, "listen": f"127.0.0.1:{inbox_port}"},
        },
    )
    # WATCHDOG_USEC=400ms: a WATCHDOG=1 every 0.2 s
    node.start(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}, wait=False)
    try:
        try:
            first = next_states(sock)
        except TimeoutError:
            raise AssertionError(f"no notification within {RECV_TIMEOUT}s:\n{node.log()}") from None
        assert first.get("READY") == "1", first
        # READY is sent after every bind: at this instant each listener already takes connections
        banner = smtp_banner("127.0.0.1", node.port)
        assert banner is not None and banner.startswith(b"220 "), banner
        assert node.admin_port is not None and accepts(node.admin_port)
        assert accepts(inbox_port)
        assert first["MAINPID"] == str(node.proc.pid if node.proc else 0)
        assert "example.test" in first["STATUS"]

        watchdogs = 0
        while watchdogs < 2:  # bounded by RECV_TIMEOUT per datagram
            assert next_states(sock) == {"WATCHDOG": "1"}
            watchdogs += 1

        assert node.proc is not None
        node.proc.terminate()
        while (states := next_states(sock)).get("WATCHDOG") == "1":
            pass  # a WATCHDOG=1 may have been on its way
        assert states.get("STOPPING") == "1", states
        assert node.proc.wait(timeout=40) == 0, node.log()
    finally:
        node.kill()
