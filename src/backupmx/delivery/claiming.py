"""Claiming: leases due recipients from the spool into the engine's window, split per destination and
at most MAX_RCPTS_PER_TRANSACTION per job, and gives leases back without an outcome.

Nothing is claimed for a destination that is not deliverable (DOWN); a destination never holds more
than half the window, so a backlog at one primary cannot starve the others. One claim query per pass
(DOWN and full destinations are excluded in it), never one per queued domain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable

from backupmx.delivery.work import MAX_RCPTS_PER_TRANSACTION, Job, Window
from backupmx.model import RecipientRecord
from backupmx.spool import Claim, Spool


class Claimer:
    def __init__(
        self,
        spool: Spool,
        window: Window,
        *,
        owner: str,
        lease: float,
        protected: Iterable[str],
        deliverable: Callable[[str], bool],
    ) -> None:
        self._spool = spool
        self._window = window
        self._owner = owner
        self._lease = lease
        self._protected = tuple(sorted(protected))
        self._deliverable = deliverable

    async def claim(self, now: float) -> int:
        """Fill the window with due recipients; returns how many were claimed."""
        w = self._window
        room = w.limit - w.claimed
        if room <= 0:
            return 0
        per_dest_cap = max(1, w.limit // 2)
        exclude = {d for d in self._protected if not self._deliverable(d)}
        exclude |= {name for name, d in w.dests.items() if d.queued >= per_dest_cap}
        claims = await self._spool.claim_due(
            now=now, owner=self._owner, lease_seconds=self._lease, limit=room, exclude_domains=sorted(exclude)
        )
        mono = time.monotonic()
        count = 0
        give_back: list[Claim] = []
        for claim in claims:
            by_domain: dict[str, list[RecipientRecord]] = {}
            for r in claim.recipients:
                by_domain.setdefault(r.domain.lower(), []).append(r)
            for domain, rcpts in by_domain.items():
                for i in range(0, len(rcpts), MAX_RCPTS_PER_TRANSACTION):
                    part = dataclasses.replace(claim, recipients=tuple(rcpts[i : i + MAX_RCPTS_PER_TRANSACTION]))
                    if not self._deliverable(domain):
                        give_back.append(part)  # went DOWN since the claim
                        continue
                    job = Job(part, domain, mono + min(part.lease_until - now, self._lease))
                    w.add(job)
                    count += job.size
        if give_back:
            await self._spool.release(give_back)
        return count

    async def release(self, jobs: list[Job]) -> None:
        """Give the leases of `jobs` back (they are out of the window already). Raises what the spool
        raises: the leases then run out on their own."""
        if jobs:
            await self._spool.release([j.claim for j in jobs])

    async def release_all(self) -> None:
        """At stop: every queued job's lease back, best effort (a failure leaves them to run out)."""
        jobs = [j for dest in self._window.dests.values() for j in self._window.drop_queue(dest)]
        with contextlib.suppress(Exception):
            await self.release(jobs)
