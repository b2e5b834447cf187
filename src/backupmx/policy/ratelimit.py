"""Message rate limit per client: a token bucket per client address, one token per MAIL command.

`[policy] rate_limit` tokens per minute refill a bucket of `rate_burst` tokens (default: rate_limit); a
MAIL with the bucket empty gets `450 4.7.1 Error: too much mail from <ip>` (Postfix's words), and the
client retries later. IPv6 clients are counted per /64 (one host gets a whole /64 to hop around in).
Memory is bounded: at most `max_clients` buckets; at the cap the least recently seen are forgotten
(such a client starts again with a full bucket). The connection limits (421 4.7.0) live in the SMTP
server; this is the message rate.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from backupmx.config import Config
from backupmx.policy import SessionInfo, Stage, Verdict
from backupmx.reply import Reply

MAX_CLIENTS = 100_000


def too_much_mail(client_ip: str) -> Reply:
    return Reply(450, "4.7.1", f"Error: too much mail from {client_ip}")


def client_key(ip: str) -> str:
    """The unit a limit counts: the IPv4 address, or the IPv6 /64."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    return address_key(addr)


def address_key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """client_key of a parsed address (an IPv4-mapped IPv6 address counts as IPv4); signinlimit.py's
    failed sign-ins are counted by the same unit."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return str(addr)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """`rate` tokens per second into buckets of `burst`, one per key."""

    def __init__(
        self, rate: float, burst: float, *, max_keys: int = MAX_CLIENTS, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._max = max_keys
        self._now = monotonic
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> bool:
        """Spend one token of `key`'s bucket; False when it is empty."""
        now = self._now()
        b = self._buckets.get(key)
        if b is None:
            self._make_room(now)
            b = self._buckets[key] = _Bucket(self.burst, now)
        else:
            b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
            b.at = now
            self._buckets.move_to_end(key)
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return True
        return False

    def _make_room(self, now: float) -> None:
        """At the cap, forget the least recently seen hundredth (amortised O(1) per new client)."""
        if len(self._buckets) < self._max:
            return
        target = self._max - max(1, self._max // 100)
        while len(self._buckets) > target:
            self._buckets.popitem(last=False)


class MessageRateLimit:
    name = "rate-limit"
    stages = frozenset({Stage.MAIL})

    def __init__(
        self,
        per_minute: int,
        burst: int = 0,
        *,
        max_clients: int = MAX_CLIENTS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._buckets = TokenBuckets(
            per_minute / 60.0, float(burst or per_minute), max_keys=max_clients, monotonic=monotonic
        )

    @classmethod
    def from_config(cls, cfg: Config) -> MessageRateLimit | None:
        p = cfg.policy
        return cls(p.rate_limit, p.rate_burst) if p.rate_limit > 0 else None

    async def check(self, stage: Stage, session: SessionInfo, address: str | None) -> Verdict:
        if self._buckets.take(client_key(session.client_ip)):
            return Verdict.cont()
        return Verdict.defer(too_much_mail(session.client_ip), log_reason="message rate limit")


__all__ = ["MessageRateLimit", "TokenBuckets", "address_key", "client_key", "too_much_mail"]
