"""`backupmx doctor` as an operator runs it (a real process): on a host that is ready every line but the
clock (the machine's own) is ok and it exits 0; on a broken one each fault has its fail line with the fix
and it exits 1. DNS goes to the tests' own server or to a loopback port where nothing listens."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from backupmx.doctor import STA_UNSYNC, Finding, Mark, _guarded, _private, judge_clock, read_kernel_clock
from tests.support.dnsserver import DnsServer
from tests.support.ports import free_port
from tests.unit.delivery.fake_primary import Primary

REPO = Path(__file__).resolve().parents[2]
TOKEN = "t" * 40


async def doctor(config: Path) -> tuple[int, dict[str, list[str]]]:
    """Exit code and the lines by subject (a fix line joins the line above it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "backupmx.cli",
        "doctor",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert not err, err.decode()
    lines: dict[str, list[str]] = {}
    last = ""
    for line in out.decode().splitlines():
        if line.startswith(" "):
            lines[last][-1] += " | " + line.strip()
        else:
            mark, last, text = line.split(None, 2)
            lines.setdefault(last, []).append(f"{mark} {text}")
    assert proc.returncode is not None
    return proc.returncode, lines


def write(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def make_cert(directory: Path) -> tuple[Path, Path]:
    subprocess.run(
        [str(REPO / "scripts" / "make-test-cert"), "--name", "backup.test", "--days", "60", str(directory)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return directory / "cert.pem", directory / "key.pem"


async def test_a_ready_host(tmp_path: Path) -> None:
    primary = await Primary().start()
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    cert, key = make_cert(tmp_path)
    token = write(tmp_path / "admin.token", TOKEN, 0o600)
    zones = {"example.test": {"@": {"MX": ["10 mx1.example.test.", "20 backup.test."]}}}
    try:
        with DnsServer(zones) as dns:
            config = write(
                tmp_path / "backupmx.toml",
                f"""
[server]
hostname = "backup.test"
listen = ["127.0.0.1:{free_port()}"]
data_dir = "{data}"
min_free_disk = "1MB"
tls_cert = "{cert}"
tls_key = "{key}"
[[domains]]
name = "example.test"
primary = ["127.0.0.1:{primary.port}"]
[admin]
listen = "127.0.0.1:{free_port()}"
token_file = "{token}"
[dns]
nameservers = ["{dns.nameserver}"]
""",
                0o600,
            )
            code, lines = await doctor(config)
    finally:
        await primary.stop()
    assert set(lines) == {
        "config",
        "install",
        "data_dir",
        "disk",
        "listen",
        "dns",
        "clock",
        "primary",
        "tls",
        "admin_token",
    }
    for subject, found in lines.items():
        if subject != "clock":  # this machine's clock may or may not be synchronised: ok or warn
            assert all(f.startswith("ok ") for f in found), (subject, found)
    assert lines["dns"] == [f"ok {dns.nameserver} answers: example.test MX 10 mx1.example.test, 20 backup.test"]
    assert lines["primary"] == [f"ok example.test: 127.0.0.1:{primary.port} answers (banner, EHLO)"]
    assert lines["clock"][0].split()[0] in ("ok", "warn")
    assert code == 0


async def test_a_broken_host(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o757)  # open to every user
    write(data / "admin.token", TOKEN, 0o644)  # the generated token's place, readable by all
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()  # a listener that is not backupmx and says nothing
    port = busy.getsockname()[1]
    config = write(
        tmp_path / "backupmx.toml",
        f"""
[server]
hostname = "backup.test"
listen = ["127.0.0.1:{port}"]
data_dir = "{data}"
min_free_disk = "1000000GB"
[[domains]]
name = "example.test"
primary = ["127.0.0.1:{free_port()}"]
[delivery]
probe_timeout = "2s"
[dns]
nameservers = ["127.0.0.1:{free_port()}"]
timeout = "1s"
""",
        0o600,
    )
    try:
        code, lines = await doctor(config)
    finally:
        busy.close()
    assert code == 1
    assert lines["config"][0].startswith("ok ")
    assert lines["data_dir"] == [
        f"fail {data}: writable by other users (mode 0757): they could change the queue "
        f"or the admin token (serve refuses to start) | fix: chmod 700 {data}"
    ]
    assert lines["disk"][0].startswith("fail ") and "server.min_free_disk = 1000.0 TB" in lines["disk"][0]
    assert lines["listen"][0].startswith(f"fail 127.0.0.1:{port}: in use by another program")
    assert "fix: stop it" in lines["listen"][0]
    assert lines["dns"][0].startswith("fail 127.0.0.1:") and "no answer for example.test MX" in lines["dns"][0]
    assert lines["primary"][0].startswith("fail example.test: no primary answers")
    assert "connection refused" in lines["primary"][0]
    assert lines["tls"][0].startswith("warn no server.tls_cert")
    token = data / "admin.token"
    assert lines["admin_token"] == [
        f"fail {token}: readable by other users (mode 0644): anyone who can read it can "
        f"use the admin API (serve refuses to start) | fix: chmod 600 {token}"
    ]


def test_who_may_read_a_secret(tmp_path: Path) -> None:
    uid = os.geteuid()
    secret = write(tmp_path / "token", TOKEN, 0o600)
    assert _private(secret, "admin_token", "can use the admin API", uid) is None
    secret.chmod(0o640)  # serve accepts it; doctor says the group reads it too
    finding = _private(secret, "admin_token", "can use the admin API", uid)
    assert finding is not None and finding.mark is Mark.WARN and finding.fix == f"chmod 600 {secret}"
    secret.chmod(0o604)
    finding = _private(secret, "admin_token", "can use the admin API", uid)
    assert finding is not None and finding.mark is Mark.FAIL and "serve refuses to start" in finding.text
    if uid == 0:  # another owner and no group access: the service user could not read it
        secret.chmod(0o600)
        os.chown(secret, 65534, 65534)
        finding = _private(secret, "admin_token", "can use the admin API", uid)
        assert finding is not None and finding.mark is Mark.FAIL and "cannot read it" in finding.text


async def test_an_invalid_config_is_one_fail_line(tmp_path: Path) -> None:
    config = write(tmp_path / "backupmx.toml", '[delivery]\nretry_min = "soon"\n', 0o600)
    code, lines = await doctor(config)
    assert code == 1 and list(lines) == ["config"]
    assert lines["config"][0].startswith(f"fail {config}: delivery.retry_min:")


@pytest.mark.parametrize(
    ("state", "status", "maxerror", "mark"),
    [
        (0, 0, 20_000, Mark.OK),  # TIME_OK, synchronised, 20 ms
        (0, 0x2001, 500_000, Mark.OK),  # PLL + nano bits only
        (5, STA_UNSYNC, 16_000_000, Mark.WARN),  # TIME_ERROR, STA_UNSYNC: no NTP client
        (0, STA_UNSYNC, 10_000, Mark.WARN),
        (0, 0, 3_000_000, Mark.WARN),  # synchronised, but 3 s of maximum error
    ],
)
def test_judge_clock(state: int, status: int, maxerror: int, mark: Mark) -> None:
    finding = judge_clock(state, status, maxerror, 1000)
    assert finding.mark is mark
    assert (finding.fix != "") is (mark is not Mark.OK)


def test_the_kernel_clock_can_be_read() -> None:
    state, _status, maxerror, esterror = read_kernel_clock()
    assert 0 <= state <= 5 and maxerror >= 0 and esterror >= 0


async def test_a_check_that_breaks_is_its_own_fail_line() -> None:
    async def broken(cfg: object) -> list[Finding]:
        raise RuntimeError("boom")

    [finding] = await _guarded("clock", broken, None)  # type: ignore[arg-type]
    assert finding == Finding(
        "clock", Mark.FAIL, "the check itself failed: RuntimeError: boom", "report this as a bug in backupmx doctor"
    )


def test_version() -> None:
    from backupmx import __version__

    res = subprocess.run(
        [sys.executable, "-m", "backupmx.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and res.stdout.strip() == f"backupmx {__version__}"
