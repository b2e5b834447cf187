"""The retry schedule: exponential backoff with jitter, a pure function of the attempt count.

Does no I/O and reads no clock; the caller passes `now`. `clamp_due` is this module's guard against a
clock that jumps backwards: a due time further ahead than `maximum` cannot have come from this
schedule, so it is pulled back (a clock that jumped back a day must not freeze retries for a day). The
engine (scheduler.py) adds its own check, comparing the clock with the one it saw at its last pass.
"""

from __future__ import annotations

from datetime import timedelta
from random import Random

JITTER = 0.10  # ±10 %, so that a restart does not retry every recipient at the same instant
_MAX_EXPONENT = 62  # 2**62 seconds is far beyond any maximum; avoids float overflow for huge counts


def next_attempt(attempts: int, *, minimum: timedelta, maximum: timedelta, rng: Random) -> timedelta:
    """The wait after the `attempts`-th failed attempt (1 = the first failure):
    minimum · 2^(attempts-1), capped at maximum, ±10 % jitter, never outside [minimum, maximum]."""
    lo = minimum.total_seconds()
    hi = max(lo, maximum.total_seconds())
    exponent = min(max(attempts, 1) - 1, _MAX_EXPONENT)
    base = min(lo * (2.0**exponent), hi)
    jittered = base * (1.0 + rng.uniform(-JITTER, JITTER))
    return timedelta(seconds=min(max(jittered, lo), hi))


def next_attempt_at(now: float, attempts: int, *, minimum: timedelta, maximum: timedelta, rng: Random) -> float:
    """Absolute time of the next attempt after the `attempts`-th failure, counted from `now`."""
    return now + next_attempt(attempts, minimum=minimum, maximum=maximum, rng=rng).total_seconds()


def clamp_due(due_at: float, now: float, *, maximum: timedelta) -> float:
    """A stored due time never lies more than `maximum` ahead of `now`; if it does, the clock went
    backwards since it was computed, and the retry is due at `now + maximum` at the latest."""
    return min(due_at, now + maximum.total_seconds())


def clock_went_back(earliest_due_at: float | None, now: float, *, maximum: timedelta) -> bool:
    """True when the earliest stored due time is further ahead than any backoff could put it:
    the wall clock moved backwards, and the queue should be made due again (see the engine)."""
    if earliest_due_at is None:
        return False
    return earliest_due_at > now + maximum.total_seconds() * (1.0 + JITTER) + 1.0
