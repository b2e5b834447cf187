"""A process that puts messages for ever, for the kill tests: `python -m tests.unit.spool.put_loop DIR`.

Several tasks put at once (so commits are grouped); after each put returns it prints
"QUEUE_ID SEED SIZE NRCPT" and flushes, so the test's ledger holds exactly what was acknowledged.
The body is `body_for(seed, size)`, so the test can check every byte after the kill.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

from backupmx.model import Envelope, Recipient
from backupmx.spool import BodyBuffer
from backupmx.spool.sqlite import SqliteSpool


def body_for(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def size_for(seed: int) -> int:
    rng = random.Random(seed ^ 0x5EED)
    return rng.choice([0, 10, 3000, 60_000, 300_000, 1_500_000]) if rng.random() < 0.3 else rng.randrange(100, 8000)


async def worker(spool: SqliteSpool, base: int, step: int, tmp: Path) -> None:
    seed = base
    while True:
        size = size_for(seed)
        nrcpt = 1 + seed % 3
        env = Envelope(
            sender=f"s{seed}@sender.example",
            recipients=tuple(Recipient(f"u{seed}.{i}@d{i}.example") for i in range(nrcpt)),
        )
        with BodyBuffer.from_bytes(body_for(seed, size), tmp) as buf:
            qid = await spool.put(env, buf)
        sys.stdout.write(f"{qid} {seed} {size} {nrcpt}\n")
        sys.stdout.flush()
        seed += step


async def main(data_dir: Path, tasks: int, start: int) -> None:
    spool = SqliteSpool(data_dir)
    await spool.open()
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    async with asyncio.TaskGroup() as tg:
        for i in range(tasks):
            tg.create_task(worker(spool, start + i, tasks, spool.tmp_dir))


if __name__ == "__main__":
    asyncio.run(
        main(
            Path(sys.argv[1]),
            int(sys.argv[2]) if len(sys.argv) > 2 else 8,
            int(sys.argv[3]) if len(sys.argv) > 3 else 0,
        )
    )
