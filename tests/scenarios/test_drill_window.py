"""`backupmx drill` against the real `backupmx serve` and a real primary on loopback: mail sent during the
window is accepted and held (the primary gets nothing), then delivered at the end; the report's counts match
what was sent, and `drill --report` and `status` show it. A window in which nobody sent mail warns; a drill
asked of a node that is not running is refused; `--stop` ends a window early."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.scenarios.test_01_serve_durability import make_body, send
from tests.scenarios.test_canary_primary import Primary, is_canary, status, wait_until
from tests.support.serve import ServeProcess


@pytest.fixture
def primary() -> Iterator[Primary]:
    p = Primary().start()
    yield p
    p.stop()


def drill_node(tmp_path: Path, primary: Primary, **extra: Any) -> ServeProcess:
    return ServeProcess(
        tmp_path / "node",
        domains=[
            {"name": "example.test", "primary": [f"127.0.0.1:{primary.port}"], "recipients": "any"},
            {"name": "other.test", "primary": [f"127.0.0.1:{primary.port}"], "recipients": "any"},
        ],
        delivery={"probe_interval": "1s", "probe_timeout": "1s", "retry_min": "1s", "retry_max": "2s"},
        admin=True,
        extra=extra,
    )


def primary_up(node: ServeProcess) -> bool:
    return all(d["primary"]["state"] == "up" for d in status(node)["domains"])


def report(node: ServeProcess, domain: str = "example.test") -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(node.cli("drill", "--report", domain, "--json").stdout)["drills"][domain]
    return doc


def user_mail(primary: Primary) -> list[tuple[str, list[str], bytes]]:
    return primary.received(lambda m: not is_canary(m))


def api(node: ServeProcess, path: str) -> Any:
    """The running node's admin API (quicker than a CLI process while a window is open)."""
    token = (node.data_dir / "admin.token").read_text().strip()
    req = urllib.request.Request(
        f"http://127.0.0.1:{node.admin_port}{path}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def test_mail_sent_during_the_window_is_held_then_delivered_and_counted(tmp_path: Path, primary: Primary) -> None:
    with drill_node(tmp_path, primary) as node:
        node.start()
        wait_until("the primaries up", lambda: primary_up(node))
        out = node.cli("drill", "example.test", "--for", "10s", "--settle", "20s").stdout
        assert "started" in out and "held until" in out
        ids = [send(node.port, make_body(i), ["alice@example.test", "bob@example.test"]) for i in range(3)]
        ids.append(send(node.port, make_body(9), ["carol@other.test"]))  # another domain: not held
        wait_until("the other domain's mail", lambda: len(user_mail(primary)) == 1)
        assert user_mail(primary)[0][1] == ["carol@other.test"]
        during = {d["domain"]: d for d in api(node, "/api/domains")["domains"]}
        assert during["example.test"]["primary"]["state"] == "down"  # held as if the primary were down
        assert "forced down: drill" in during["example.test"]["primary"]["last_error"]
        assert during["example.test"]["messages_pending"] == 3
        assert during["other.test"]["primary"]["state"] == "up"
        time.sleep(1.0)
        assert len(user_mail(primary)) == 1  # still held
        assert report(node)["state"] == "running"

        rep = wait_until("the report", lambda: (r := report(node))["state"] == "done" and r, timeout=30)
        assert rep["ok"] is True
        counts = (rep["accepted_messages"], rep["accepted"], rep["delivered"], rep["held"], rep["bounced"])
        assert counts == (3, 6, 6, 0, 0)
        assert rep["warnings"] == [] and rep["not_delivered"] == []
        assert 9.5 <= rep["ended_at"] - rep["started_at"] < 13
        delivered = user_mail(primary)
        assert len(delivered) == 4 and node.queue_count() == 0
        assert sorted(r for m in delivered for r in m[1]) == ["alice@example.test"] * 3 + ["bob@example.test"] * 3 + [
            "carol@other.test"
        ]

        text = node.cli("drill", "--report", "example.test").stdout
        assert "ok: everything accepted in the window was delivered" in text and "delivered  6" in text
        assert "last drill" in (st := node.cli("status").stdout) and "3 accepted" not in st  # recipients counted
        assert "6 accepted, 6 delivered, 0 held, 0 bounced" in st
        log = node.log()
        assert "backupmx/drill-started:" in log and "backupmx/drill-released:" in log
        assert "backupmx/drill-finished:" in log and "ok=yes" in log
        assert status(node)["domains"][0]["primary"]["state"] in ("up", "recovering")
        assert node.terminate() == 0


def test_an_empty_window_warns_and_wait_prints_the_report(tmp_path: Path, primary: Primary) -> None:
    with drill_node(tmp_path, primary) as node:
        node.start()
        wait_until("the primaries up", lambda: primary_up(node))
        res = node.cli("drill", "example.test", "--for", "2s", "--settle", "5s", "--wait")
        assert res.returncode == 0
        assert "accepted   0 message(s), 0 recipient(s)" in res.stdout
        assert "warning: no mail for example.test was accepted during the window" in res.stdout
        assert "no sender used the backup" in node.cli("status").stdout
        assert node.terminate() == 0


def test_stop_ends_the_window_early_and_a_second_drill_is_refused(tmp_path: Path, primary: Primary) -> None:
    with drill_node(tmp_path, primary) as node:
        node.start()
        wait_until("the primaries up", lambda: primary_up(node))
        node.cli("drill", "example.test", "--for", "10m")
        again = node.cli("drill", "example.test", "--for", "1m", check=False)
        assert again.returncode == 1 and "already running" in again.stderr
        send(node.port, make_body(1))
        time.sleep(0.5)
        assert not user_mail(primary)
        started = time.monotonic()
        assert "ends now" in node.cli("drill", "example.test", "--stop").stdout
        rep = wait_until("the report", lambda: (r := report(node))["state"] == "done" and r, timeout=30)
        assert time.monotonic() - started < 60  # the window was 10 minutes
        assert (rep["accepted"], rep["delivered"], rep["held"]) == (1, 1, 0) and rep["ok"]
        assert len(user_mail(primary)) == 1
        stop_again = node.cli("drill", "example.test", "--stop", check=False)
        assert stop_again.returncode == 1 and "no drill of example.test is running" in stop_again.stderr
        assert node.terminate() == 0


def test_sigterm_during_a_drill_releases_the_domain_first(tmp_path: Path, primary: Primary) -> None:
    with drill_node(tmp_path, primary) as node:
        node.start()
        wait_until("the primaries up", lambda: primary_up(node))
        node.cli("drill", "example.test", "--for", "10m")
        send(node.port, make_body(1))
        started = time.monotonic()
        assert node.terminate() == 0
        assert time.monotonic() - started < 25  # no wait for the window, nor for the 30s stop grace
        rep = report(node)
        assert rep["state"] in ("done", "interrupted") and rep["ended_at"] is not None
        node.start()
        wait_until("the message", lambda: len(user_mail(primary)) == 1)
        assert node.terminate() == 0


def test_after_sigkill_during_a_drill_the_report_says_interrupted_and_the_mail_goes(
    tmp_path: Path, primary: Primary
) -> None:
    with drill_node(tmp_path, primary) as node:
        node.start()
        wait_until("the primaries up", lambda: primary_up(node))
        node.cli("drill", "example.test", "--for", "10m")
        send(node.port, make_body(1))
        assert report(node)["state"] == "running"
        node.kill()
        node.start()  # the declared outage holds the domain until the first probe; the drill is over
        wait_until("the held message", lambda: len(user_mail(primary)) == 1)
        rep = wait_until("the report", lambda: (r := report(node))["state"] == "interrupted" and r)
        assert "serve stopped during the drill" in rep["detail"]
        assert node.terminate() == 0


def test_without_a_running_serve_the_request_is_refused_quickly(tmp_path: Path, primary: Primary) -> None:
    node = drill_node(tmp_path, primary)
    started = time.monotonic()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "backupmx.cli",
            "drill",
            "example.test",
            "--for",
            "1m",
            "--config",
            str(node.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "is it running with this configuration?" in res.stderr
    assert time.monotonic() - started < 30
    # the request is gone: a serve started later does not begin a drill nobody is waiting for
    with node:
        node.start()
        wait_until("the primaries up", lambda: primary_up(node))
        time.sleep(1.5)
        assert report(node) is None
        assert node.terminate() == 0
