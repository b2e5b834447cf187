"""sd_notify: the environment systemd sets, read the way sd_notify(3) and sd_watchdog_enabled(3) say, and
datagrams that reach a real AF_UNIX socket at a path and in the abstract namespace."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from backupmx.sdnotify import Notifier, running


def test_no_socket_means_no_notifications() -> None:
    n = Notifier.from_environment({})
    assert not n.enabled and n.watchdog_interval is None and n.send("READY=1") is False


@pytest.mark.parametrize(
    ("env", "address", "interval"),
    [
        ({"NOTIFY_SOCKET": "/run/systemd/notify"}, "/run/systemd/notify", None),
        ({"NOTIFY_SOCKET": "@/org/x"}, "\0/org/x", None),
        ({"NOTIFY_SOCKET": "relative"}, None, None),  # neither a path nor abstract: ignored, with a warning
        ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30000000"}, "/n", 15.0),
        ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, "/n", 15.0),
        ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, "/n", None),  # for another pid
        ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "soon"}, "/n", None),
        ({"WATCHDOG_USEC": "30000000"}, None, None),
    ],
)
def test_environment(env: dict[str, str], address: str | None, interval: float | None) -> None:
    n = Notifier.from_environment(env)
    assert (n.address, n.watchdog_interval) == (address, interval)


def test_datagrams_to_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        assert Notifier.from_environment({"NOTIFY_SOCKET": path}).send("READY=1", "STATUS=up")
        assert sock.recv(100) == b"READY=1\nSTATUS=up"


def test_a_missing_socket_is_logged_not_raised(tmp_path: Path) -> None:
    assert Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone")}).send("READY=1") is False


async def test_running_sends_ready_watchdog_then_stopping() -> None:
    name = f"backupmx-unit-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "100000"}
        async with running("serving example.test", env):
            ready = (await asyncio.to_thread(sock.recv, 200)).decode().split("\n")
            assert ready[:2] == ["READY=1", "STATUS=serving example.test"]
            assert await asyncio.to_thread(sock.recv, 200) == b"WATCHDOG=1"
        last = b"WATCHDOG=1"
        while last == b"WATCHDOG=1":
            last = await asyncio.to_thread(sock.recv, 200)
        assert last.startswith(b"STOPPING=1\n")
