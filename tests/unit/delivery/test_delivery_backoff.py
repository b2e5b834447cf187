"""Table tests of the retry schedule and of retention with outage pauses."""

from __future__ import annotations

from datetime import timedelta
from random import Random

import pytest

from backupmx.clock import FakeClock
from backupmx.delivery.backoff import JITTER, clamp_due, clock_went_back, next_attempt, next_attempt_at
from backupmx.delivery.retention import RetentionPolicy, is_expired, retention_used
from backupmx.spool import OutagePeriod

MIN = timedelta(minutes=1)
MAX = timedelta(hours=1)


class _NoJitter(Random):
    def uniform(self, a: float, b: float) -> float:
        return 0.0


@pytest.mark.parametrize(
    ("attempts", "expected_s"),
    [
        (0, 60),  # defensive: treated as the first failure
        (1, 60),
        (2, 120),
        (3, 240),
        (4, 480),
        (5, 960),
        (6, 1920),
        (7, 3600),  # capped
        (50, 3600),
        (10_000, 3600),  # no overflow for absurd counts
    ],
)
def test_exponential_and_capped(attempts: int, expected_s: float) -> None:
    assert next_attempt(attempts, minimum=MIN, maximum=MAX, rng=_NoJitter()).total_seconds() == expected_s


@pytest.mark.parametrize("attempts", [1, 2, 3, 5, 8, 30])
def test_jitter_stays_within_bounds(attempts: int) -> None:
    rng = Random(attempts)
    base = min(60 * 2 ** (attempts - 1), 3600)
    seen = set()
    for _ in range(500):
        s = next_attempt(attempts, minimum=MIN, maximum=MAX, rng=rng).total_seconds()
        assert 60 <= s <= 3600
        assert base * (1 - JITTER) - 1e-9 <= s <= base * (1 + JITTER) + 1e-9
        seen.add(round(s, 3))
    assert len(seen) > 10  # there is jitter


def test_minimum_equals_maximum() -> None:
    d = next_attempt(9, minimum=timedelta(seconds=5), maximum=timedelta(seconds=5), rng=Random(1))
    assert d == timedelta(seconds=5)


def test_next_attempt_at_is_relative_to_now() -> None:
    clock = FakeClock()
    at = next_attempt_at(clock.now(), 2, minimum=MIN, maximum=MAX, rng=_NoJitter())
    assert at == clock.now() + 120


@pytest.mark.parametrize(
    ("due_offset", "expected_offset"),
    [
        (-10, -10),  # already due: unchanged
        (30, 30),  # within the maximum: unchanged
        (3600, 3600),
        (86_400, 3600),  # clock went back a day: pulled to now + maximum
    ],
)
def test_clamp_due(due_offset: float, expected_offset: float) -> None:
    now = 1_700_000_000.0
    assert clamp_due(now + due_offset, now, maximum=MAX) == now + expected_offset


@pytest.mark.parametrize(
    ("earliest", "went_back"),
    [(None, False), (-5.0, False), (3600.0, False), (3600 * 1.1, False), (86_400.0, True)],
)
def test_clock_went_back(earliest: float | None, went_back: bool) -> None:
    now = 1_700_000_000.0
    due = None if earliest is None else now + earliest
    assert clock_went_back(due, now, maximum=MAX) is went_back


# --- retention ---------------------------------------------------------------------------------
T0 = 1_700_000_000.0
DAY = 86_400.0


def _o(start_day: float, end_day: float | None, domain: str = "example.com") -> OutagePeriod:
    return OutagePeriod(domain, T0 + start_day * DAY, None if end_day is None else T0 + end_day * DAY)


@pytest.mark.parametrize(
    ("outages", "now_day", "used_days"),
    [
        ([], 0, 0),
        ([], 5, 5),
        ([_o(1, 3)], 5, 3),  # two days paused
        ([_o(-5, 1)], 5, 4),  # outage began before the message arrived
        ([_o(1, 3), _o(2, 4)], 5, 2),  # overlapping outages count once
        ([_o(1, None)], 5, 1),  # open outage runs until now
        ([_o(6, 8)], 5, 5),  # an outage after now changes nothing
        ([_o(1, 2), _o(3, 4)], 5, 3),
        ([], -1, 0),  # clock behind the arrival: nothing used
    ],
)
def test_retention_used(outages: list[OutagePeriod], now_day: float, used_days: float) -> None:
    assert retention_used(T0, T0 + now_day * DAY, outages) == pytest.approx(used_days * DAY)


RET = timedelta(days=30)
CAP = timedelta(days=90)


@pytest.mark.parametrize(
    ("outages", "now_day", "expired"),
    [
        ([], 29.9, False),
        ([], 30, True),
        ([_o(1, 11)], 35, False),  # 10 days paused: 25 used
        ([_o(1, 11)], 40, True),
        ([_o(0, None)], 89.9, False),  # declared outage for the whole time: retention paused ...
        ([_o(0, None)], 90, True),  # ... up to the hard cap
        ([_o(0, 80)], 91, True),  # cap on the wall clock, even with retention left
    ],
)
def test_is_expired(outages: list[OutagePeriod], now_day: float, expired: bool) -> None:
    assert is_expired(T0, T0 + now_day * DAY, outages, retention=RET, cap=CAP) is expired


def test_expiry_with_fake_clock_and_outage() -> None:
    clock = FakeClock(T0)
    policy = RetentionPolicy(retention=timedelta(days=2), cap=timedelta(days=5))
    outages = [OutagePeriod("example.com", T0 + DAY, None)]
    clock.advance(4 * DAY)
    assert not policy.expired(T0, clock.now(), outages)  # only one day counted
    assert policy.expires_at(T0, clock.now(), outages) == T0 + 5 * DAY  # open outage: the cap
    outages = [OutagePeriod("example.com", T0 + DAY, T0 + 4 * DAY)]
    assert policy.expires_at(T0, clock.now(), outages) == pytest.approx(clock.now() + DAY)
    clock.advance(DAY)
    assert policy.expired(T0, clock.now(), outages)
