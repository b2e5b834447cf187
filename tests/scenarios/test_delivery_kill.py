"""SIGKILL right after the primary's 250 and before our commit (fault point
"delivery.after_remote_250"): after a restart the message is delivered again, a duplicate, never a loss."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from backupmx.clock import FakeClock, SystemClock
from backupmx.model import RecipientState
from tests.unit.delivery.fake_primary import Primary
from tests.unit.delivery.harness import BODY, Harness, make_config

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import asyncio, sys
from pathlib import Path
from backupmx.clock import SystemClock
from tests.unit.delivery.harness import Harness, make_config

async def main() -> None:
    h = Harness(Path(sys.argv[1]), make_config(sys.argv[2]), clock=SystemClock())
    await h.open()
    await h.engine.run_once()
    await h.close()

asyncio.run(main())
"""


async def test_kill_after_remote_250_duplicates_never_loses(tmp_path: Path) -> None:
    primary = await Primary().start()
    try:
        cfg = make_config(primary.hostport)
        h = await Harness(tmp_path, cfg, clock=SystemClock()).open()
        qid = await h.put("a@example.com", "b@example.com")
        await h.close()

        env = dict(
            os.environ,
            BACKUPMX_FAULT="delivery.after_remote_250",
            PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, str(tmp_path), primary.hostport, env=env, cwd=ROOT
        )
        assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
        assert len(primary.received) == 1  # the primary has it; we never recorded that

        # restart, once the dead process's lease has run out
        h2 = await Harness(tmp_path, cfg, clock=FakeClock(time.time() + 3600)).open()
        rec = await h2.get(qid)
        assert {r.state for r in rec.recipients} == {RecipientState.QUEUED}
        await h2.engine.run_once()
        rec = await h2.get(qid)
        assert {r.state for r in rec.recipients} == {RecipientState.DELIVERED}
        assert primary.contents() == [BODY, BODY]  # one duplicate, no loss
        assert await h2.engine.run_once() == 0
        await h2.close()
    finally:
        await primary.stop()
