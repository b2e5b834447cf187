"""Per-destination concurrency: slow start (the connection limit `cwnd` grows with good transactions and
shrinks on 4xx, 421 and timeouts) and the cache of idle sessions kept for the next message.

Sessions are closed in the engine's task group (`spawn`), so a slow QUIT never holds up a worker; with
no task group (the engine is not running) they are aborted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from backupmx.config import DeliveryConfig
from backupmx.delivery.relay import RelaySession, TransactionResult
from backupmx.delivery.work import Destination, Window
from backupmx.model import Deferred

CACHE_IDLE = 5.0  # seconds an idle cached connection is kept

Spawn = Callable[[Coroutine[Any, Any, None]], bool]  # runs a coroutine in the task group; False: none


class Connections:
    def __init__(self, window: Window, settings: DeliveryConfig, spawn: Spawn) -> None:
        self._window = window
        self._d = settings
        self._spawn = spawn

    # -- slow start --------------------------------------------------------------------------------
    @staticmethod
    def limit(dest: Destination) -> int:
        return max(1, int(dest.cwnd))

    def restart(self, dest: Destination) -> None:
        """A recovered primary starts small."""
        dest.cwnd = float(self._d.concurrency_initial)

    @staticmethod
    def connect_failed(dest: Destination) -> None:
        dest.cwnd = max(1.0, dest.cwnd / 2)

    def feedback(self, dest: Destination, result: TransactionResult) -> None:
        """+1 connection per `cwnd` good transactions; -1 on a 4xx; halve on 421/timeouts."""
        if result.timed_out or any(isinstance(o, Deferred) and o.reply.code == 421 for o in result.outcomes):
            dest.cwnd = max(1.0, dest.cwnd / 2)
        elif any(isinstance(o, Deferred) and 400 <= o.reply.code < 500 for o in result.outcomes):
            dest.cwnd = max(1.0, dest.cwnd - 1)
        elif result.final_reply is not None and result.final_reply.code // 100 == 2:
            dest.cwnd = min(float(self._d.concurrency_max), dest.cwnd + 1.0 / max(dest.cwnd, 1.0))

    # -- the cache of idle sessions ----------------------------------------------------------------
    def take(self, dest: Destination) -> RelaySession | None:
        while dest.cache:
            session, _ = dest.cache.pop()
            if session.usable:
                return session
            session.abort()
        return None

    def put(self, dest: Destination, session: RelaySession, *, keep: bool) -> None:
        """A worker is done with `session`: cache it when `keep` (not stopping, destination deliverable)
        and the destination has room, else close it."""
        if (
            keep
            and session.usable
            and session.transactions < self._d.messages_per_connection
            and dest.connections + len(dest.cache) < self.limit(dest)
        ):
            dest.cache.append((session, time.monotonic()))
        else:
            self.close_later(session)

    def close_later(self, session: RelaySession) -> None:
        if not self._spawn(session.quit()):
            session.abort()

    def expire(self) -> None:
        cutoff = time.monotonic() - CACHE_IDLE
        for dest in self._window.dests.values():
            keep = []
            for session, since in dest.cache:
                if since < cutoff or not session.usable:
                    self.close_later(session)
                else:
                    keep.append((session, since))
            dest.cache = keep

    def drop(self, dest: Destination) -> None:
        for session, _ in dest.cache:
            self.close_later(session)
        dest.cache = []

    async def close(self) -> None:
        sessions = [s for d in self._window.dests.values() for s, _ in d.cache]
        for d in self._window.dests.values():
            d.cache = []
        await asyncio.gather(*(s.quit() for s in sessions), return_exceptions=True)
