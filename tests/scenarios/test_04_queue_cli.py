"""Scenario 04: the queue commands work beside a running `serve` (their own SQLite connections on the
same file) and follow `postqueue -p` habits: list, show, count, hold, release, delete, flush."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from tests.scenarios.test_01_serve_durability import make_body, send
from tests.support.serve import ServeProcess, free_port


def test_queue_commands_beside_a_running_server(tmp_path: Path) -> None:
    node = ServeProcess(
        tmp_path / "node",
        domains=[{"name": "example.test", "primary": [f"127.0.0.1:{free_port()}"]}],  # nothing listens
        delivery={"probe_interval": "1s", "probe_timeout": "1s", "down_after": 1},
    )
    with node:
        node.start()
        a = send(node.port, make_body(1, size=4000), ["alice@example.test", "bob@example.test"])
        b = send(node.port, make_body(2, size=2000), ["carol@example.test"])
        assert node.queue_count() == 2
        deadline = time.monotonic() + 15  # the probe declares the outage
        while "down since" not in node.cli("queue", "list").stdout and time.monotonic() < deadline:
            time.sleep(0.3)

        listing = node.cli("queue", "list").stdout
        assert listing.startswith("-Queue ID-")
        assert re.search(rf"^{a}  +\d+ \w{{3}} \w{{3}} \d\d \d\d:\d\d:\d\d +sender@sender.test$", listing, re.M)
        assert "(held: primary of example.test down since " in listing
        assert "-- 7 Kbytes in 2 Requests." in listing

        doc = json.loads(node.cli("queue", "list", "--json").stdout)
        assert doc["count"] == 2 and [m["id"] for m in doc["messages"]] == [a, b]
        assert {r["address"] for r in doc["messages"][0]["recipients"]} == {"alice@example.test", "bob@example.test"}

        shown = node.cli("queue", "show", a).stdout
        assert f"Queue ID:   {a}" in shown and "Subject: message 1" in shown and "alice@example.test" in shown
        body = node.cli("queue", "show", a, "--body").stdout
        assert body.startswith("Received: ") and "line of message 1" in body

        assert "held 2 recipient(s)" in node.cli("queue", "hold", a).stdout
        assert re.search(rf"^{a}! ", node.cli("queue", "list").stdout, re.M)  # `!` marks held, as mailq does
        assert node.queue_count() == 2  # held mail is still mail we owe
        assert "released 2 recipient(s)" in node.cli("queue", "release", a).stdout
        assert "held 3 recipient(s)" in node.cli("queue", "hold", "--all").stdout
        assert "released 3 recipient(s)" in node.cli("queue", "release", "--all").stdout
        # release made them due now, so a flush has nothing left to move forward
        assert re.fullmatch(r"flushed [0-3] recipient\(s\)\n", node.cli("queue", "flush", "example.test").stdout)
        assert node.cli("queue", "flush", "other.test").stdout == "flushed 0 recipient(s)\n"

        assert f"deleted {b}" in node.cli("queue", "delete", b).stdout
        assert node.queue_count() == 1
        missing = node.cli("queue", "delete", b, check=False)
        assert missing.returncode == 1 and f"no message {b}" in missing.stderr and "Traceback" not in missing.stderr
        usage = node.cli("queue", "hold", check=False)
        assert usage.returncode == 2 and "give a queue ID or --all" in usage.stderr
        assert node.alive()
