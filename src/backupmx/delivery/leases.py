"""Keeping leases: every job in the window has its lease renewed every third of the lease, in real time
(a lease protects against other nodes, whose clocks are real). A job whose lease was taken over is
forgotten: it is someone else's now. A failed renewal is logged and tried again a third of a lease later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from backupmx.clock import Clock
from backupmx.delivery.work import Job, Window
from backupmx.errors import LeaseLost
from backupmx.spool import Spool

log = logging.getLogger("backupmx.delivery")


class LeaseKeeper:
    def __init__(
        self, spool: Spool, clock: Clock, window: Window, *, lease: float, stopping: Callable[[], bool]
    ) -> None:
        self._spool = spool
        self._clock = clock
        self._window = window
        self._lease = lease
        self._stopping = stopping

    async def run(self) -> None:
        every = max(self._lease / 3.0, 0.2)
        while not self._stopping():
            await self._wait(every)
            if self._stopping():
                break
            await self.renew_all()

    async def renew_all(self) -> None:
        jobs = list(self._window.jobs)
        if not jobs:
            return
        now = self._clock.now()
        mono = time.monotonic()
        try:
            await self._spool.renew([j.claim for j in jobs], now=now, lease_seconds=self._lease)
            for job in jobs:
                job.lease_ends = mono + self._lease
        except LeaseLost:
            for job in jobs:  # find the ones taken over; they are someone else's now
                try:
                    await self._spool.renew([job.claim], now=now, lease_seconds=self._lease)
                    job.lease_ends = mono + self._lease
                except LeaseLost:
                    self._window.forget(job)
                except Exception:
                    log.exception("renewing a lease")
        except Exception:
            log.exception("renewing leases")

    async def check(self, job: Job) -> bool:
        """Before MAIL FROM and before the final dot: renew `job`'s lease; False when it is not ours any
        more (another node, or our own re-claim after it ran out, may hold it) or cannot be shown to be
        (the spool unavailable): the transaction is then abandoned, nothing delivered, a copy avoided."""
        try:
            await self._spool.renew([job.claim], now=self._clock.now(), lease_seconds=self._lease)
        except LeaseLost:
            log.warning("%s: lease lost before delivery; abandoned (someone else delivers it)", job.claim.message.id)
            return False
        except Exception as e:
            log.warning(
                "%s: lease could not be renewed before delivery (%s); abandoned, it comes back", job.claim.message.id, e
            )
            return False
        job.lease_ends = time.monotonic() + self._lease
        return True

    async def _wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stopping() and time.monotonic() < end:
            await asyncio.sleep(min(0.2, end - time.monotonic()))
