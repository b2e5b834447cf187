"""The parsed messages the emergency inbox shows: each message is parsed once per view (the page, its
HTML frame and its attachments all reuse it, and readers opening it at once share one parse), on a
small executor of its own, so MIME parsing never takes the threads that serve spool reads (and the
admin /healthz). A message past the view's budget (render.too_large) is not parsed at all.
Kept: at most MAX_ENTRIES messages holding MAX_BODY_BYTES of bodies together, each for TTL_SECONDS.
A spool error reaches the caller and nothing is kept, so the next request tries again.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from backupmx.continuity.render import MAX_VIEW_BYTES, ParsedMessage, TooLarge, parse_message, too_large

T = TypeVar("T")

PARSE_THREADS = 2  # parsing is CPU work under the GIL: more threads would not make it faster
MAX_ENTRIES = 16
MAX_BODY_BYTES = 64 * 1024 * 1024
TTL_SECONDS = 120.0

View = ParsedMessage | TooLarge


def _retrieved(task: asyncio.Task[View]) -> None:
    """Every reader may have left: the outcome is read here so asyncio does not report it as lost."""
    if not task.cancelled():
        task.exception()


def _view(body: bytes) -> View:
    return too_large(body) or parse_message(body)


class ViewCache:
    def __init__(self, *, threads: int = PARSE_THREADS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="inbox-parse")
        # queue ID -> (stored at, body size, the parse shared by every reader of that moment)
        self._entries: OrderedDict[str, tuple[float, int, asyncio.Task[View]]] = OrderedDict()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on the parse threads (sanitising and list summaries go there too)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def view(self, queue_id: str, size: int, read_body: Callable[[], Awaitable[bytes]]) -> View:
        if size > MAX_VIEW_BYTES:
            return TooLarge(size, 0)  # not even read
        now = time.monotonic()
        hit = self._entries.get(queue_id)
        if hit is not None and now - hit[0] < TTL_SECONDS:
            self._entries.move_to_end(queue_id)
            task = hit[2]
        else:
            task = asyncio.ensure_future(self._load(read_body))  # kept in _entries: one parse for all readers
            task.add_done_callback(_retrieved)
            self._entries[queue_id] = (now, size, task)
            self._trim(now)
        try:
            # shielded: a reader who leaves does not cancel the parse others wait for
            return await asyncio.shield(task)
        except Exception:
            if self._entries.get(queue_id, (0.0, 0, None))[2] is task:
                del self._entries[queue_id]
            raise

    async def _load(self, read_body: Callable[[], Awaitable[bytes]]) -> View:
        body = await read_body()
        return await self.run(_view, body)

    def _trim(self, now: float) -> None:
        total = 0
        for kept, (key, (at, size, _task)) in enumerate(reversed(list(self._entries.items())), 1):  # newest first
            total += size
            if now - at >= TTL_SECONDS or total > MAX_BODY_BYTES or kept > MAX_ENTRIES:
                del self._entries[key]  # a reader still waiting on it keeps its task; only sharing ends

    def close(self) -> None:
        for _at, _size, task in self._entries.values():
            task.cancel()
        self._entries.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
