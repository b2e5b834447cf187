"""The failed-sign-in limiter: a burst per IPv4 address or IPv6 /64, refilled over the window, and
bounded memory."""

from __future__ import annotations

from backupmx.clock import FakeClock
from backupmx.signinlimit import FailureLimiter, client_network


def test_clients_are_addresses_or_ipv6_slash_64() -> None:
    assert client_network("192.0.2.7") == "192.0.2.7"
    assert client_network("2001:db8:1:2:aaaa::1") == client_network("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_network("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_network("fe80::1%eth0") == "fe80::/64"
    assert client_network(None) == "?"


def test_a_burst_then_429_until_the_bucket_refills() -> None:
    clock = FakeClock(1000.0)
    lim = FailureLimiter(clock, burst=10, window=600)
    for _ in range(10):
        assert lim.retry_after("2001:db8::1") is None
        lim.failed("2001:db8::1")
    wait = lim.retry_after("2001:db8::2")  # the same /64
    assert wait is not None and 1 <= wait <= 60
    assert lim.retry_after("2001:db8:0:1::1") is None  # another /64
    assert lim.retry_after("192.0.2.1") is None
    clock.advance(wait)
    assert lim.retry_after("2001:db8::1") is None  # one more try after Retry-After
    lim.failed("2001:db8::1")
    assert lim.retry_after("2001:db8::1") is not None
    clock.advance(600)
    assert lim.retry_after("2001:db8::1") is None and not lim._buckets  # fully forgiven, forgotten


def test_memory_is_bounded() -> None:
    lim = FailureLimiter(FakeClock(0.0), max_clients=100)
    for i in range(1000):
        lim.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(lim._buckets) == 100
