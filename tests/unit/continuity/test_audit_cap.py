"""The audit log under a flood: refusals of one client are one line for the first and one with the count
for the rest of the burst, and the file is rotated at its cap, so the log stays under twice the cap."""

from __future__ import annotations

import json
from pathlib import Path

from backupmx.continuity.audit import BURST_GAP, AuditLog


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_a_burst_of_refusals_is_two_lines(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    t = 1000.0
    for i in range(300):
        log.refusal(
            t + i * 0.1,
            "signin-refused",
            actor="192.0.2.1",
            client="192.0.2.1",
            why="invalid" if i < 10 else "rate-limited",
        )
    assert len(lines(log.path)) == 1  # only the first, at once
    log.refusal(t + 5, "signin-refused", actor="192.0.2.2", client="192.0.2.2", why="invalid")
    log.flush(t + 30)  # the burst has not ended yet
    assert len(lines(log.path)) == 2
    log.flush(t + 30 + BURST_GAP + 1)
    out = lines(log.path)
    assert len(out) == 3
    assert out[2]["count"] == 299 and out[2]["why"] == {"invalid": 9, "rate-limited": 290}
    # a burst lasting longer than a minute writes its count once a minute, not once per attempt
    for i in range(600):
        log.refusal(t + 1000 + i * 0.5, "signin-refused", actor="192.0.2.3", client="192.0.2.3", why="invalid")
    log.flush(t + 2000, everything=True)
    again = [e for e in lines(log.path) if e["actor"] == "192.0.2.3"]
    assert 4 <= len(again) <= 7 and sum(int(str(e.get("count", 1))) for e in again) == 600


def test_the_log_is_rotated_at_its_cap(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", max_bytes=10_000)
    for i in range(1000):
        log.write(1000.0 + i, "view", actor="192.0.2.1", address="alice@example.test", id=f"{i:014d}")
    assert log.path.stat().st_size <= 10_000 and log.rotated.stat().st_size <= 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log", "audit.log.1"]
    read = list(log.read())
    assert read and read[-1].fields["id"] == f"{999:014d}"
    assert [e.at for e in read] == sorted(e.at for e in read)  # the rotated file is read first
