"""The message rate limit: token buckets per client (IPv6 per /64), refill, burst, bounded memory."""

from __future__ import annotations

import pytest

from backupmx.config import config_from_dict
from backupmx.policy import Action, SessionInfo, Stage
from backupmx.policy.ratelimit import MessageRateLimit, TokenBuckets, client_key


class Tick:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def mail(limit: MessageRateLimit, ip: str) -> str:
    v = await limit.check(Stage.MAIL, SessionInfo(client_ip=ip), "s@sender.test")
    return "ok" if v.action is Action.CONTINUE else str(v.reply)


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("unknown", "unknown"),
    ],
)
def test_client_key(ip: str, key: str) -> None:
    assert client_key(ip) == key


async def test_burst_then_refill_per_client() -> None:
    tick = Tick()
    limit = MessageRateLimit(60, 3, monotonic=tick)  # one a second, three at once
    assert [await mail(limit, "192.0.2.1") for _ in range(4)] == [
        "ok",
        "ok",
        "ok",
        "450 4.7.1 Error: too much mail from 192.0.2.1",
    ]
    assert await mail(limit, "192.0.2.2") == "ok"  # another client has its own bucket
    tick.t += 1.0
    assert await mail(limit, "192.0.2.1") == "ok"
    assert await mail(limit, "192.0.2.1") != "ok"
    tick.t += 3600  # refills to the burst, not beyond
    assert [await mail(limit, "192.0.2.1") for _ in range(4)].count("ok") == 3


async def test_ipv6_neighbours_share_a_bucket() -> None:
    tick = Tick()
    limit = MessageRateLimit(60, 2, monotonic=tick)
    assert await mail(limit, "2001:db8::1") == "ok"
    assert await mail(limit, "2001:db8::2") == "ok"
    assert (await mail(limit, "2001:db8::3")).startswith("450 4.7.1")
    assert await mail(limit, "2001:db8:0:1::1") == "ok"


def test_memory_is_bounded() -> None:
    tick = Tick()
    buckets = TokenBuckets(1.0, 2.0, max_keys=100, monotonic=tick)
    for i in range(1000):
        buckets.take(f"k{i}")
        assert len(buckets) <= 100
    # a limited client that keeps sending stays the most recently seen: it is not forgotten
    buckets.take("hot")
    buckets.take("hot")
    for i in range(500):
        assert not buckets.take("hot")
        buckets.take(f"new{i}")


def test_from_config() -> None:
    assert MessageRateLimit.from_config(config_from_dict({})) is None
    limit = MessageRateLimit.from_config(config_from_dict({"policy": {"rate_limit": 30}}))
    assert limit is not None and limit._buckets.burst == 30 and limit._buckets.rate == 0.5
    limit = MessageRateLimit.from_config(config_from_dict({"policy": {"rate_limit": 30, "rate_burst": 5}}))
    assert limit is not None and limit._buckets.burst == 5
    with pytest.raises(ValueError):
        TokenBuckets(0, 1)
