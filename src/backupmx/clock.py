"""Time, injected. Everything that schedules asks a Clock, so tests can jump ahead with FakeClock
instead of sleeping. Wall time is float seconds since the epoch (what the spool stores).
`wait_event_or_timeout` is the one "sleep until the timer runs out or someone wakes us" of every loop;
`iso_time` and `format_span` write a time and a duration the one way the CLI, the API and the pages show them."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol, overload


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that moves only when told. `sleep` yields to the loop but returns at once after
    advancing time, so loops driven by it run fast and deterministically."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self._now += max(0.0, seconds)
        await asyncio.sleep(0)


async def wait_event_or_timeout(clock: Clock, event: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` on `clock`, or less if `event` is set meanwhile; True when the event is set.

    An event already set returns at once; `seconds <= 0` only yields to the loop once. The event is not
    cleared: the caller owns it (clear it before deciding to sleep, so a wake-up in between is not lost).
    The timer is `clock.sleep`, so under FakeClock the wait ends after one turn of the loop with time moved
    on by `seconds`, exactly as a plain `clock.sleep` would."""
    if event.is_set():
        return True
    if seconds <= 0:
        await asyncio.sleep(0)
        return event.is_set()
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    waker = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeper, waker):
            task.cancel()
        await asyncio.gather(sleeper, waker, return_exceptions=True)
    return event.is_set()


def format_span(seconds: float, *, minute_seconds: bool = False) -> str:
    """A duration for people: "42s", "5m" ("5m 20s" with `minute_seconds`), "3h 12m", "1d 4h".
    Negative durations (a clock that moved back) read as "0s"."""
    s = int(max(0.0, seconds))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {sec}s" if minute_seconds else f"{m}m"
    return f"{sec}s"


@overload
def iso_time(t: float) -> str: ...
@overload
def iso_time(t: None) -> None: ...
@overload
def iso_time(t: float | None) -> str | None: ...
def iso_time(t: float | None) -> str | None:
    """A wall time for machines and JSON: "2026-11-24T10:15:01+00:00" (None stays None)."""
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
