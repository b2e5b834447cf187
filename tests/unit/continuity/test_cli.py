"""The commands (cli/access.py) through backupmx.cli.main, in-process, on a real SQLite spool:
access grant/link/revoke/list/audit, continuity open/close/auto/status, queue export, and --notify
through a smarthost (aiosmtpd on loopback)."""

from __future__ import annotations

import asyncio
import csv
import email
import email.policy
import json
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from backupmx.cli import main
from backupmx.continuity.tokens import Signer, load_secret
from backupmx.spool.sqlite import SqliteSpool
from tests.support.serve import free_port, render_toml
from tests.unit.continuity import mail
from tests.unit.continuity.harness import put


class Sink:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Ok"


@pytest.fixture
def smarthost() -> Iterator[tuple[Sink, int]]:
    sink = Sink()
    port = free_port()
    ctl = Controller(sink, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        yield sink, port
    finally:
        ctl.stop()


def write_config(tmp: Path, **continuity: Any) -> Path:
    path = tmp / "backupmx.toml"
    path.write_text(
        render_toml(
            {
                "server": {"hostname": "backup.test", "listen": ["127.0.0.1:2525"], "data_dir": str(tmp / "data")},
                "domains": [
                    {"name": "example.test", "primary": ["127.0.0.1:1"]},
                    {"name": "other.test", "primary": ["127.0.0.1:1"]},
                ],
                "admin": {"listen": ""},
                "continuity": {
                    "enabled": True,
                    "listen": "127.0.0.1:18099",
                    "base_url": "https://mail-backup.example.test",
                    **continuity,
                },
            }
        )
    )
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def seed(tmp: Path, items: Sequence[tuple[Sequence[str], bytes]]) -> list[str]:
    async def go() -> list[str]:
        s = SqliteSpool(tmp / "data", node="t")
        await s.open()
        try:
            return [await put(s, rcpts, body) for rcpts, body in items]
        finally:
            await s.close()

    return asyncio.run(go())


def test_grant_prints_a_signed_link_and_audits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write_config(tmp_path))
    code, out, err = run(capsys, "access", "grant", "Alice@Example.test", "--expires", "2d", "--config", cfg)
    assert code == 0, err
    link = out.strip().splitlines()[-1]
    assert link.startswith("https://mail-backup.example.test/signin?t=v1.")
    claims = Signer(load_secret(tmp_path / "data" / "continuity.key")).verify_link(link.split("t=", 1)[1], now=0)
    assert claims.address == "alice@example.test"
    assert stat.S_IMODE(os.stat(tmp_path / "data" / "continuity.key").st_mode) == 0o600
    code, out, _ = run(capsys, "access", "list", "--json", "--config", cfg)
    assert [g["subject"] for g in json.loads(out)["grants"]] == ["alice@example.test"]
    code, out, _ = run(capsys, "access", "link", "alice@example.test", "--config", cfg)
    assert code == 0 and out.strip().splitlines()[-1] != link
    code, out, _ = run(capsys, "access", "revoke", "alice@example.test", "--config", cfg)
    assert code == 0 and "revoked" in out
    code, _, err = run(capsys, "access", "revoke", "alice@example.test", "--config", cfg)
    assert code == 1 and "no grant" in err
    code, _, err = run(capsys, "access", "link", "alice@example.test", "--config", cfg)
    assert code == 1 and "no access grant" in err
    code, out, _ = run(capsys, "access", "audit", "--config", cfg)
    events = [line.split()[1] for line in out.splitlines()]
    assert events == ["grant", "link", "link", "revoke"]
    assert "v1." not in out  # no token in the audit log
    audit = tmp_path / "data" / "continuity-audit.log"
    assert stat.S_IMODE(os.stat(audit).st_mode) == 0o600 and "v1." not in audit.read_text()


def test_grant_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write_config(tmp_path))
    for argv, why in (
        (["alice@elsewhere.test"], "not a protected domain"),
        (["alice@example.test", "--expires", "400d"], "grant_max"),
        (["alice@example.test", "--expires", "soon"], "--expires"),
        (["alice"], "not an address"),
        ([], "give an ADDRESS or --domain"),
        (["alice@example.test", "--notify", "bob@example.test"], "is a protected domain"),
        (["alice@example.test", "--notify", "alice@home.test"], "smarthost"),
    ):
        code, _, err = run(capsys, "access", "grant", *argv, "--config", cfg)
        assert code != 0 and why in err, (argv, err)


def test_domain_grant_writes_a_private_csv_of_links(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write_config(tmp_path))
    seed(
        tmp_path,
        [
            (["alice@example.test", "bob@example.test"], mail.plain()),
            (["alice@example.test"], mail.html()),
            (["carol@other.test"], mail.plain(to="carol@other.test")),
        ],
    )
    out_csv = tmp_path / "links.csv"
    code, out, err = run(capsys, "access", "grant", "--domain", "example.test", "--csv", str(out_csv), "--config", cfg)
    assert code == 0, err
    assert "2 link(s)" in out
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["address"], r["held_messages"]) for r in rows] == [
        ("alice@example.test", "2"),
        ("bob@example.test", "1"),
    ]
    assert all(r["link"].startswith("https://mail-backup.example.test/signin?t=v1.") for r in rows)
    assert stat.S_IMODE(os.stat(out_csv).st_mode) == 0o600
    code, out, _ = run(capsys, "access", "list", "--config", cfg)
    assert "@example.test (every recipient)" in out


def test_gate_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write_config(tmp_path))
    code, out, _ = run(capsys, "continuity", "status", "--json", "--config", cfg)
    assert [d["open"] for d in json.loads(out)["domains"]] == [False, False]
    code, out, _ = run(capsys, "continuity", "open", "example.test", "--config", cfg)
    assert code == 0 and "example.test: emergency inbox open (opened by hand)" in out
    code, out, _ = run(capsys, "continuity", "status", "--config", cfg)
    assert "example.test" in out and "OPEN" in out
    code, out, _ = run(capsys, "continuity", "close", "example.test", "--config", cfg)
    assert "closed (closed by hand)" in out
    code, out, _ = run(capsys, "continuity", "auto", "example.test", "--config", cfg)
    assert "closed (no outage is declared)" in out
    code, _, err = run(capsys, "continuity", "open", "nowhere.test", "--config", cfg)
    assert code == 2 and "not a protected domain" in err


def test_notify_sends_the_link_through_the_smarthost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], smarthost: tuple[Sink, int]
) -> None:
    sink, port = smarthost
    cfg = str(write_config(tmp_path, smarthost=f"127.0.0.1:{port}", notify_from="it@backup.test"))
    code, out, err = run(
        capsys, "access", "grant", "alice@example.test", "--notify", "alice.home@private.test", "--config", cfg
    )
    assert code == 0, err
    link = next(line for line in out.splitlines() if line.startswith("https://"))
    ((sender, rcpts, content),) = sink.messages
    assert sender == "it@backup.test" and rcpts == ["alice.home@private.test"]
    msg = email.message_from_bytes(content, policy=email.policy.default)
    body = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert link in body and "비밀번호는 필요하지 않습니다" in body and "No password is needed" in body
    code, out, _ = run(capsys, "access", "audit", "--config", cfg)
    assert "notify" in out and "alice.home@private.test" in out


def test_smarthost_must_not_be_a_primary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write_config(tmp_path, smarthost="127.0.0.1:1"))
    code, _, err = run(capsys, "access", "list", "--config", cfg)
    assert code == 2 and "is the primary of example.test" in err


def test_queue_export_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write_config(tmp_path))
    ids = seed(tmp_path, [(["alice@example.test"], mail.plain(subject=f"n{i}")) for i in range(3)])
    code, _out, err = run(
        capsys,
        "queue",
        "export",
        "--recipient",
        "alice@example.test",
        "--format",
        "eml",
        str(tmp_path / "out"),
        "--config",
        cfg,
    )
    assert code == 0, err
    assert "exported 3 messages" in err  # the closing line of the progress bar, on stderr
    assert sorted(p.stem for p in (tmp_path / "out" / "alice@example.test").glob("*.eml")) == sorted(ids)
