"""Failed sign-in attempts per client network, for both web listeners: the emergency inbox's links and
the admin token. Each IPv4 address, and each IPv6 /64 (one host often has a whole /64), has a bucket of
`burst` failures that refills at `burst` per `window`; with the bucket empty, further attempts are
answered 429 with Retry-After, whether the token would have been right or not. Memory is bounded:
at most `max_clients` buckets, the stalest dropped first. Behind a reverse proxy every client is the
proxy's address (X-Forwarded-For is not trusted): the limit then holds for everyone together.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass

from backupmx.clock import Clock
from backupmx.policy.ratelimit import address_key

BURST = 10  # failures allowed at once
WINDOW_SECONDS = 600.0  # ... refilled over this time (one every minute)
MAX_CLIENTS = 10_000


def client_network(remote: str | None) -> str:
    """The unit limited: the IPv4 address, or the IPv6 /64 (an IPv4-mapped IPv6 address is IPv4)."""
    try:
        addr = ipaddress.ip_address((remote or "").split("%", 1)[0])
    except ValueError:
        return remote or "?"
    return address_key(addr)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class FailureLimiter:
    def __init__(
        self, clock: Clock, *, burst: int = BURST, window: float = WINDOW_SECONDS, max_clients: int = MAX_CLIENTS
    ) -> None:
        self.clock = clock
        self.burst = burst
        self.rate = burst / window  # failures forgiven per second
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _bucket(self, key: str) -> _Bucket | None:
        b = self._buckets.get(key)
        if b is None:
            return None
        now = self.clock.now()
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
        b.at = now
        if b.tokens >= self.burst:  # fully forgiven: forget the client
            del self._buckets[key]
            return None
        return b

    def retry_after(self, remote: str | None) -> int | None:
        """Seconds before this client may try again, or None when it may try now."""
        b = self._bucket(client_network(remote))
        if b is None or b.tokens >= 1.0:
            return None
        return max(1, math.ceil((1.0 - b.tokens) / self.rate))

    def failed(self, remote: str | None) -> None:
        key = client_network(remote)
        b = self._bucket(key)
        if b is None:
            b = _Bucket(float(self.burst), self.clock.now())
            self._buckets[key] = b
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        b.tokens = max(0.0, b.tokens - 1.0)
        self._buckets.move_to_end(key)
