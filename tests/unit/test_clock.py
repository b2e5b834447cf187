"""The clock's one wait: a timer on the injected clock, cut short by an event."""

from __future__ import annotations

import asyncio
import time

import pytest

from backupmx.clock import FakeClock, SystemClock, format_span, wait_event_or_timeout


async def test_an_event_already_set_returns_at_once_without_moving_time() -> None:
    clock, event = FakeClock(), asyncio.Event()
    event.set()
    t0 = clock.now()
    assert await wait_event_or_timeout(clock, event, 60.0) is True
    assert clock.now() == t0 and event.is_set()  # not cleared: the caller owns it


async def test_on_a_fake_clock_the_timer_moves_time_and_returns_at_once() -> None:
    clock, event = FakeClock(), asyncio.Event()
    t0 = clock.now()
    assert await asyncio.wait_for(wait_event_or_timeout(clock, event, 3600.0), 1.0) is False
    assert clock.now() == t0 + 3600.0
    assert await wait_event_or_timeout(clock, event, 0.0) is False  # only a turn of the loop
    assert await wait_event_or_timeout(clock, event, -1.0) is False
    assert clock.now() == t0 + 3600.0


async def test_the_event_cuts_a_real_timer_short_and_nothing_is_left_running() -> None:
    event = asyncio.Event()
    before = len(asyncio.all_tasks())
    asyncio.get_running_loop().call_later(0.05, event.set)
    t0 = time.monotonic()
    assert await wait_event_or_timeout(SystemClock(), event, 30.0) is True
    assert time.monotonic() - t0 < 5.0
    assert await wait_event_or_timeout(SystemClock(), asyncio.Event(), 0.05) is False
    assert len(asyncio.all_tasks()) == before


async def test_cancelling_the_waiter_cancels_its_timer_and_its_watch() -> None:
    before = len(asyncio.all_tasks())
    waiter = asyncio.create_task(wait_event_or_timeout(SystemClock(), asyncio.Event(), 30.0))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert waiter.cancelled()
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before


@pytest.mark.parametrize(
    ("seconds", "plain", "precise"),
    [
        (-5, "0s", "0s"),
        (0, "0s", "0s"),
        (42.9, "42s", "42s"),
        (320, "5m", "5m 20s"),
        (3 * 3600 + 12 * 60 + 5, "3h 12m", "3h 12m"),
        (86400 + 4 * 3600 + 59, "1d 4h", "1d 4h"),
    ],
)
def test_format_span(seconds: float, plain: str, precise: str) -> None:
    assert format_span(seconds) == plain
    assert format_span(seconds, minute_seconds=True) == precise
