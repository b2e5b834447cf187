"""The raw SMTP client of the test_edge_* scenarios (no tests here): a blocking socket from a chosen
loopback source address (127.0.0.2, 127.0.0.3 ... are all this host), bytes exactly as given, every
read bounded in time, STARTTLS by hand. Also: the mail log lines of a `serve` log, and TLS helpers."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0


class EdgeClient:
    def __init__(self, port: int, *, source: str = "127.0.0.1", banner: bool = True, timeout: float = TIMEOUT) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self._buf = b""
        self.banner = self.reply() if banner else ""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by the server (buffered: {self._buf[:200]!r})")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> str:
        """One whole reply, as its last line ("250 2.1.5 Ok")."""
        while True:
            line = self._line().decode("utf-8", "replace")
            if len(line) < 4 or line[3] != "-":
                return line

    def reply_lines(self) -> list[str]:
        lines = []
        while True:
            line = self._line().decode("utf-8", "replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines

    def cmd(self, line: str | bytes) -> str:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server has closed the connection (EOF or reset) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, OSError):
            return True

    def starttls(self, ctx: ssl.SSLContext | None = None) -> None:
        """Wrap the socket after a 220 to STARTTLS (not sent here: the caller may pipeline after it)."""
        if ctx is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        assert not self._buf, f"bytes after the 220 before the handshake: {self._buf!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname="backup.test")

    def send_mail(
        self, body: bytes, *, sender: str = "s@sender.test", rcpts: tuple[str, ...] = ("alice@ours.test",)
    ) -> list[str]:
        """MAIL, RCPT..., DATA, the body (dot-stuffed here), the final dot: every reply."""
        out = [self.cmd(f"MAIL FROM:<{sender}>")]
        out += [self.cmd(f"RCPT TO:<{r}>") for r in rcpts]
        out.append(self.cmd("DATA"))
        if not out[-1].startswith("354"):
            return out
        stuffed = body.replace(b"\r\n.", b"\r\n..")
        if stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        self.send(stuffed + b".\r\n")
        out.append(self.reply())
        return out


_EVENT = re.compile(r" backupmx/([a-z-]+): ")


def maillog_events(log_text: str, name: str) -> list[str]:
    """The mail log lines of event `name` in a `serve` log (the mail log goes to stderr)."""
    return [ln for ln in log_text.splitlines() if (m := _EVENT.search(ln)) and m.group(1) == name]


def make_cert(directory: Path, name: str = "backup.test") -> tuple[Path, Path]:
    """scripts/make-test-cert: (cert, key)."""
    subprocess.run(
        [str(REPO / "scripts" / "make-test-cert"), "--name", name, "--days", "2", str(directory)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return directory / "cert.pem", directory / "key.pem"


def wait_for(predicate: object, timeout: float = 15.0, interval: float = 0.1) -> bool:
    """Poll `predicate()` until true or `timeout` (bounded)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
