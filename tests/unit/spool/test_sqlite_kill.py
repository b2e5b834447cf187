"""Kill tests: a process puts messages in a loop and prints each ID once `put` returned; we kill it with
SIGKILL at random moments and at the fault points around COMMIT, reopen, and check that every printed
ID is there byte-exact and that nothing is half-stored (RELIABILITY.md §4 rows 1-4)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backupmx.model import QueueId
from backupmx.spool.sqlite import SqliteSpool
from tests.unit.spool.integrity import check_integrity
from tests.unit.spool.put_loop import body_for

REPO = Path(__file__).resolve().parents[3]


class Run:
    """One put_loop process and the ledger of what it was told."""

    def __init__(self, data_dir: Path, start: int, env_extra: dict[str, str] | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
        argv = [sys.executable, "-m", "tests.unit.spool.put_loop", str(data_dir), "8", str(start)]
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        self.ledger: list[tuple[QueueId, int, int, int]] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "READY":
                self.ready.set()
                continue
            qid, seed, size, nrcpt = line.split()
            self.ledger.append((QueueId(qid), int(seed), int(size), int(nrcpt)))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        return rc


async def _verify(data_dir: Path, ledger: list[tuple[QueueId, int, int, int]]) -> int:
    """Every acknowledged message is present and byte-exact; returns how many messages the spool holds."""
    problems = check_integrity(data_dir / "spool.db")
    assert problems == [], problems
    spool = SqliteSpool(data_dir)
    await spool.open()
    try:
        for qid, seed, size, nrcpt in ledger:
            rec = await spool.get(qid)
            assert rec is not None, f"{qid} was acknowledged but is gone"
            assert len(rec.recipients) == nrcpt
            assert rec.envelope.sender == f"s{seed}@sender.example"
            assert await spool.read_body(qid) == body_for(seed, size), f"{qid}: body differs"
        assert await spool.list_corrupt() == []
        return await spool.count_pending()
    finally:
        await spool.close()


@pytest.mark.slow
async def test_random_kills_lose_nothing_acknowledged(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    rng = random.Random(1234)
    ledger: list[tuple[QueueId, int, int, int]] = []
    for round_ in range(8):
        run = Run(data_dir, start=round_ * 1_000_000)
        assert run.ready.wait(30), "put_loop did not start"
        time.sleep(rng.uniform(0.05, 1.2))
        run.kill()
        assert run.wait(30) == -signal.SIGKILL
        ledger += run.ledger
        held = await _verify(data_dir, ledger)
        assert held >= len(ledger)
    assert len(ledger) > 50, "the loop hardly ran; the test proves little"
    print(f"{len(ledger)} acknowledged messages over 8 kills, all present")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "after"),
    [
        ("spool.before_commit", 1),
        ("spool.before_commit", 7),
        ("spool.after_commit", 1),
        ("spool.after_commit", 7),
    ],
)
async def test_kill_at_fault_points(tmp_path: Path, point: str, after: int) -> None:
    data_dir = tmp_path / "data"
    run = Run(data_dir, start=0, env_extra={"BACKUPMX_FAULT": point, "BACKUPMX_FAULT_AFTER": str(after)})
    assert run.wait(60) == -signal.SIGKILL, "the fault point did not fire"
    held = await _verify(data_dir, run.ledger)
    if point == "spool.before_commit" and after == 1:
        assert held == 0 and run.ledger == []  # the first group never committed: nothing of it exists
    if point == "spool.after_commit" and after == 1:
        assert run.ledger == [] and held >= 1  # committed but never acknowledged: kept (a possible duplicate)
    assert held >= len(run.ledger)
