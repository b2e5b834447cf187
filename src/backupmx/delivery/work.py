"""The engine's in-memory work: a Job (one claimed message's recipients of one destination), a
Destination (its queue, connections, connection cache, slow-start limit and counters) and the Window
that holds both, bounded by `delivery.window` recipients.

No I/O: claiming (claiming.py) fills the window, workers (scheduler.py) empty it; a job leaves the
window once its outcome is recorded, its lease is given back, or the lease was lost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from backupmx.delivery.relay import RelaySession
from backupmx.spool import Claim

MAX_RCPTS_PER_TRANSACTION = 100  # RFC 5321 §4.5.3.1.8: a server must accept at least 100


@dataclass(eq=False)
class Job:
    claim: Claim  # one message, the recipients of one destination (at most MAX_RCPTS_PER_TRANSACTION)
    domain: str
    lease_ends: float = 0.0  # time.monotonic() when the lease runs out (as of the last claim or renewal)

    @property
    def size(self) -> int:
        return len(self.claim.recipients)


@dataclass(eq=False)
class Destination:
    domain: str
    cwnd: float
    queue: deque[Job] = field(default_factory=deque)
    connections: int = 0
    in_flight: int = 0
    cache: list[tuple[RelaySession, float]] = field(default_factory=list)  # (session, idle since)
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    expired: int = 0
    held: int = 0

    @property
    def queued(self) -> int:
        return sum(j.size for j in self.queue)


class Window:
    """Every job in memory (`jobs`, what the lease keeper renews) and every destination seen."""

    def __init__(self, limit: int, concurrency_initial: int) -> None:
        self.limit = limit
        self._initial = float(concurrency_initial)
        self.jobs: set[Job] = set()
        self.dests: dict[str, Destination] = {}

    @property
    def claimed(self) -> int:
        return sum(j.size for j in self.jobs)

    def dest(self, domain: str) -> Destination:
        dest = self.dests.get(domain)
        if dest is None:
            dest = Destination(domain, self._initial)
            self.dests[domain] = dest
        return dest

    def add(self, job: Job) -> None:
        self.jobs.add(job)
        self.dest(job.domain).queue.append(job)

    def done(self, job: Job) -> None:
        """The job has left its queue (a worker took it) and is finished with."""
        self.jobs.discard(job)

    def forget(self, job: Job) -> None:
        """The job's lease is someone else's now: out of the window and out of its queue."""
        self.jobs.discard(job)
        dest = self.dests.get(job.domain)
        if dest is not None and job in dest.queue:
            dest.queue.remove(job)

    def prune(self, keep: set[str]) -> None:
        """Forget idle destinations not in `keep` (the protected and rerouted ones): senders' domains,
        seen for a DSN, come and go; their totals stay in the statistics' totals."""
        for name in [n for n, d in self.dests.items() if n not in keep and _idle(d)]:
            del self.dests[name]

    def take_queue(self, dest: Destination) -> list[Job]:
        """Empty `dest`'s queue; the jobs stay in the window until each is done with."""
        jobs = list(dest.queue)
        dest.queue.clear()
        return jobs

    def drop_queue(self, dest: Destination) -> list[Job]:
        """Empty `dest`'s queue and take its jobs out of the window (to give their leases back)."""
        jobs = self.take_queue(dest)
        for job in jobs:
            self.jobs.discard(job)
        return jobs


def _idle(dest: Destination) -> bool:
    return not dest.queue and not dest.cache and dest.connections == 0 and dest.in_flight == 0
