"""The canary through the real `backupmx serve` to a real primary on loopback (aiosmtpd in a thread):
delivered with its latency and the primary's reply recorded, stored as kind canary, never user mail; and
with the primary refusing the canary address (550), the "backup path broken" alert fires once, shows in the
mail log, /metrics, `backupmx status` and an `[[alerts]]` webhook, and clears once when the primary accepts the
address again."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.serve import ServeProcess, free_port

CANARY = "canary@example.test"


class Primary:
    """An aiosmtpd primary in a thread; refuses the canary address with 550 while `refuse` is set."""

    def __init__(self) -> None:
        self.port = free_port()
        self.refuse = False
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.refused = 0
        self._lock = threading.Lock()
        self.controller: Any = None

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]) -> str:
        if self.refuse and address.lower() == CANARY:
            with self._lock:
                self.refused += 1
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content)))
        return "250 2.0.0 Ok: queued as PRIMARY"

    def start(self) -> Primary:
        from aiosmtpd.controller import Controller

        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def received(
        self, predicate: Callable[[tuple[str, list[str], bytes]], bool] = lambda m: True
    ) -> list[tuple[str, list[str], bytes]]:
        with self._lock:
            return [m for m in self.messages if predicate(m)]


class Webhook:
    """An `[[alerts]]` webhook receiver on loopback, in a thread: keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                posts.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def alerts(self, name: str) -> list[tuple[str, str | None]]:
        return [(p["status"], p["domain"]) for p in list(self.posts) if p["alert"] == name]


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    w = Webhook()
    yield w
    w.stop()


@pytest.fixture
def primary() -> Iterator[Primary]:
    p = Primary().start()
    yield p
    p.stop()


def canary_node(tmp_path: Path, primary: Primary, *, deadline: str = "4s", alerts: str | None = None) -> ServeProcess:
    extra: dict[str, Any] = {
        "canary": [{"domain": "example.test", "to": CANARY, "interval": "1s", "deadline": deadline}]
    }
    if alerts is not None:
        extra["alerts"] = [{"kind": "webhook", "url": alerts, "interval": "1s", "free_disk_below": "1KB"}]
    return ServeProcess(
        tmp_path / "node",
        domains=[{"name": "example.test", "primary": [f"127.0.0.1:{primary.port}"], "recipients": "any"}],
        delivery={"probe_interval": "1s", "probe_timeout": "1s", "retry_min": "1s", "retry_max": "2s"},
        extra=extra,
        admin=True,
    )


def wait_until(what: str, check: Callable[[], object], timeout: float = 20.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def status(node: ServeProcess) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(node.cli("status", "--json").stdout)
    return doc


def metrics(node: ServeProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def alert_lines(node: ServeProcess, state: str) -> list[str]:
    return [ln for ln in node.log().splitlines() if "backupmx/canary-alert:" in ln and f"status={state}" in ln]


def is_canary(m: tuple[str, list[str], bytes]) -> bool:
    return b"X-Backupmx-Canary: node=backup.test; domain=example.test; id=" in m[2]


def test_canary_is_delivered_to_a_real_primary_and_its_latency_recorded(tmp_path: Path, primary: Primary) -> None:
    with canary_node(tmp_path, primary) as node:
        node.start()
        wait_until("two canaries at the primary", lambda: len(primary.received(is_canary)) >= 2)
        sender, rcpts, data = primary.received(is_canary)[0]
        assert sender == "<>" and rcpts == [CANARY]  # aiosmtpd spells the null sender "<>"
        assert b"by backup.test (backupmx" in data  # it went through our listener: our Received header
        assert b"Subject: backupmx canary for example.test via backup.test" in data

        doc = wait_until("a judged canary in status", lambda: (d := status(node))["domains"][0]["canary"]["last"] and d)
        canary = doc["domains"][0]["canary"]
        assert canary["last"]["outcome"] == "delivered" and canary["broken"] is False
        assert canary["last"]["reply"] == "250 2.0.0 Ok: queued as PRIMARY"
        assert 0 < canary["last"]["latency"] < 4
        assert doc["serve"]["reachable"] and doc["domains"][0]["primary"]["state"] in ("up", "recovering")
        text = node.cli("status").stdout
        assert "canary      delivered in " in text and "250 2.0.0 Ok: queued as PRIMARY" in text

        # never user mail: not pending, kind canary in the queue, no "accepted user mail" on the admin side
        assert node.queue_count() == 0
        listed = json.loads(node.cli("queue", "list", "--all", "--json").stdout)["messages"]
        assert listed and {m["kind"] for m in listed} == {"canary"}
        assert all(r["state"] == "delivered" for m in listed for r in m["recipients"])
        text = metrics(node)
        assert 'backupmx_backup_path_broken{domain="example.test"} 0.0' in text
        assert 'backupmx_canary_latency_seconds{domain="example.test"}' in text
        assert 'backupmx_canary_runs_total{domain="example.test",outcome="delivered"}' in text
        assert node.terminate() == 0
    assert not alert_lines(node, "firing")


def test_refused_canary_address_fires_the_alert_once_and_clears_it_once(
    tmp_path: Path, primary: Primary, webhook: Webhook
) -> None:
    primary.refuse = True
    with canary_node(tmp_path, primary, alerts=webhook.url) as node:
        node.start()
        wait_until("the alert", lambda: alert_lines(node, "firing"))
        wait_until("the webhook's alert", lambda: webhook.alerts("backup_path_broken"))
        wait_until("two more refusals", lambda: primary.refused >= 3)  # failures go on; the alert is not repeated
        assert len(alert_lines(node, "firing")) == 1
        assert (
            "550 5.1.1" in alert_lines(node, "firing")[0]
            and "backup path broken for example.test" in alert_lines(node, "firing")[0]
        )
        assert 'backupmx_backup_path_broken{domain="example.test"} 1.0' in metrics(node)
        doc = status(node)
        canary = doc["domains"][0]["canary"]
        assert canary["broken"] is True and canary["last"]["outcome"] == "failed"
        assert canary["last"]["reply"].startswith("550 5.1.1")
        assert doc["domains"][0]["primary"]["state"] == "up"  # the primary answers: only the path is broken
        assert "BACKUP PATH BROKEN since" in node.cli("status").stdout
        assert node.queue_count() == 0  # a refused canary owes nobody a DSN and leaves the queue

        primary.refuse = False  # fixed
        wait_until("the recovery", lambda: alert_lines(node, "resolved"))
        seen = len(primary.received(is_canary))
        wait_until("two more canaries", lambda: len(primary.received(is_canary)) >= seen + 2)
        assert len(alert_lines(node, "firing")) == 1 and len(alert_lines(node, "resolved")) == 1
        assert 'backupmx_backup_path_broken{domain="example.test"} 0.0' in metrics(node)
        assert status(node)["domains"][0]["canary"]["broken"] is False
        wait_until("the webhook's recovery", lambda: len(webhook.alerts("backup_path_broken")) == 2)
        time.sleep(2.5)  # more evaluations with the path working: nothing more
        assert webhook.alerts("backup_path_broken") == [("firing", "example.test"), ("resolved", "example.test")]
        firing = next(p for p in webhook.posts if p["alert"] == "backup_path_broken")
        assert "550 5.1.1" in firing["summary"] and firing["node"] == "backup.test"
        assert node.terminate() == 0
