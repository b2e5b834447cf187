"""Routes: configured primaries, MX hosts ranked better than ours (RFC 5321 §5.1), never ourselves,
the last good answer when DNS fails, implicit MX and NXDOMAIN for other domains."""

from __future__ import annotations

import pytest

from backupmx.config import config_from_dict
from backupmx.delivery.route import (
    DnsNoSuchDomain,
    DnsTemporaryError,
    RouteResolver,
    RouteSource,
    Target,
)
from backupmx.errors import RouteError


class FakeDns:
    def __init__(
        self, mx: dict[str, list[tuple[int, str]] | Exception], hosts: dict[str, list[str] | Exception]
    ) -> None:
        self.mx_table = mx
        self.hosts = hosts
        self.calls = 0

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        self.calls += 1
        v = self.mx_table.get(domain, DnsNoSuchDomain(domain))
        if isinstance(v, Exception):
            raise v
        return v

    async def addresses(self, host: str) -> list[str]:
        v = self.hosts.get(host, DnsNoSuchDomain(host))
        if isinstance(v, Exception):
            raise v
        return v


OURS = "192.0.2.2"


def resolver(
    dns: FakeDns, domains: list[dict[str, object]] | None = None, listen: tuple[str, ...] = ("0.0.0.0:25",)
) -> RouteResolver:
    cfg = config_from_dict(
        {
            "server": {"hostname": "backup.example.com", "listen": list(listen)},
            "domains": domains if domains is not None else [{"name": "example.com"}],
        }
    )
    return RouteResolver(cfg, dns, is_local_address=lambda a: a in (OURS, "127.0.0.1"))


STD_HOSTS: dict[str, list[str] | Exception] = {
    "mx1.example.com": ["192.0.2.10"],
    "mx0.example.com": ["192.0.2.9", "2001:db8::9"],
    "backup.example.com": [OURS],
    "alias.example.net": [OURS],
    "worse.example.com": ["192.0.2.20"],
}


async def test_mx_better_than_ours_only() -> None:
    dns = FakeDns(
        {
            "example.com": [
                (20, "backup.example.com"),
                (10, "mx1.example.com"),
                (5, "mx0.example.com"),
                (30, "worse.example.com"),
            ]
        },
        STD_HOSTS,
    )
    route = await resolver(dns).resolve("example.com")
    assert route.source is RouteSource.MX
    assert [t.address for t in route.targets] == ["192.0.2.9", "2001:db8::9", "192.0.2.10"]
    assert all(t.port == 25 for t in route.targets)
    assert route.targets[0].host == "mx0.example.com"


async def test_equal_preference_is_skipped() -> None:
    dns = FakeDns({"example.com": [(10, "backup.example.com"), (10, "mx1.example.com")]}, STD_HOSTS)
    with pytest.raises(RouteError, match="loop"):
        await resolver(dns).resolve("example.com")


async def test_we_are_found_by_address_under_another_name() -> None:
    dns = FakeDns({"example.com": [(10, "alias.example.net"), (20, "mx1.example.com")]}, STD_HOSTS)
    with pytest.raises(RouteError):
        await resolver(dns).resolve("example.com")


async def test_mx_host_resolving_to_us_is_skipped_even_when_better() -> None:
    hosts = dict(STD_HOSTS, **{"mx0.example.com": [OURS]})
    dns = FakeDns({"example.com": [(5, "mx0.example.com"), (10, "mx1.example.com"), (20, "worse.example.com")]}, hosts)
    # mx0 resolves to us: our preference is 5, nothing ranks better
    with pytest.raises(RouteError):
        await resolver(dns).resolve("example.com")


async def test_not_listed_uses_all_mx_but_never_self() -> None:
    dns = FakeDns({"example.com": [(10, "mx1.example.com"), (20, "worse.example.com")]}, STD_HOSTS)
    route = await resolver(dns).resolve("example.com")
    assert [t.address for t in route.targets] == ["192.0.2.10", "192.0.2.20"]


async def test_dns_failure_uses_last_good_answer() -> None:
    dns = FakeDns({"example.com": [(10, "mx1.example.com"), (20, "backup.example.com")]}, STD_HOSTS)
    r = resolver(dns)
    first = await r.resolve("example.com")
    dns.mx_table["example.com"] = DnsTemporaryError("SERVFAIL")
    again = await r.resolve("example.com")
    assert again.source is RouteSource.CACHED and again.targets == first.targets
    dns.mx_table["example.com"] = DnsNoSuchDomain("example.com")  # even NXDOMAIN: never bounce ours
    assert (await r.resolve("example.com")).source is RouteSource.CACHED


async def test_dns_failure_without_history_defers() -> None:
    dns = FakeDns({"example.com": DnsTemporaryError("timeout")}, STD_HOSTS)
    with pytest.raises(RouteError):
        await resolver(dns).resolve("example.com")
    dns2 = FakeDns({}, STD_HOSTS)  # NXDOMAIN for a protected domain: defer, not bounce
    with pytest.raises(RouteError):
        await resolver(dns2).resolve("example.com")


async def test_configured_primary_list_in_order() -> None:
    dns = FakeDns({}, {"p1.internal": ["10.0.0.1"], "p2.internal": DnsTemporaryError("x")})
    r = resolver(dns, [{"name": "example.com", "primary": ["p1.internal:2525", "p2.internal", "10.0.0.3:26"]}])
    route = await r.resolve("example.com")
    assert route.source is RouteSource.CONFIG
    assert route.targets == (
        Target("p1.internal", 2525, "10.0.0.1"),
        Target("p2.internal", 25, None),
        Target("10.0.0.3", 26, "10.0.0.3"),
    )
    assert dns.calls == 0  # no MX lookup for a configured primary


async def test_configured_primary_that_is_us_is_skipped() -> None:
    dns = FakeDns({}, {})
    r = resolver(
        dns, [{"name": "example.com", "primary": ["127.0.0.1:2525", "127.0.0.1:2526"]}], listen=("127.0.0.1:2525",)
    )
    route = await r.resolve("example.com")
    assert [t.port for t in route.targets] == [2526]
    r2 = resolver(dns, [{"name": "example.com", "primary": ["127.0.0.1:2525"]}], listen=("127.0.0.1:2525",))
    with pytest.raises(RouteError, match="loop"):
        await r2.resolve("example.com")


async def test_other_domain_all_mx_and_implicit_mx() -> None:
    dns = FakeDns(
        {"sender.example": [(10, "mx1.example.com"), (20, "worse.example.com")], "nomx.example": []},
        dict(STD_HOSTS, **{"nomx.example": ["198.51.100.7"]}),
    )
    r = resolver(dns)
    route = await r.resolve("sender.example")
    assert [t.address for t in route.targets] == ["192.0.2.10", "192.0.2.20"]
    implicit = await r.resolve("nomx.example")
    assert implicit.source is RouteSource.IMPLICIT
    assert implicit.targets == (Target("nomx.example", 25, "198.51.100.7"),)


async def test_other_domain_nxdomain_and_null_mx_are_permanent() -> None:
    dns = FakeDns({"nullmx.example": [(0, ".")]}, {})
    r = resolver(dns)
    nx = await r.resolve("gone.example")
    assert nx.targets == () and nx.failure is not None and nx.failure.status == "5.1.2"
    null = await r.resolve("nullmx.example")
    assert null.failure is not None and null.failure.status == "5.1.10"


async def test_other_domain_temporary_failure_defers() -> None:
    dns = FakeDns({"sender.example": DnsTemporaryError("SERVFAIL")}, {})
    with pytest.raises(RouteError):
        await resolver(dns).resolve("sender.example")


async def test_mx_port_for_tests() -> None:
    dns = FakeDns({"sender.example": [(10, "mx1.example.com")]}, STD_HOSTS)
    cfg = config_from_dict({"server": {"hostname": "b.test", "listen": ["127.0.0.1:2525"]}})
    r = RouteResolver(cfg, dns, mx_port=2600)
    assert (await r.resolve("sender.example")).targets[0].port == 2600


async def test_real_dns_server_with_port() -> None:
    """dnspython against `[dns] nameservers = ["IP:PORT"]` (the test DNS server), then a SERVFAIL."""
    from tests.support.dnsserver import DnsServer

    zones = {
        "example.test": {
            "@": {"MX": ["10 mx1", "20 backup"]},
            "mx1": {"A": "127.0.0.1"},
            "backup": {"A": "192.0.2.99"},
        },
        "sender.test": {"@": {"A": "127.0.0.2"}},
    }
    with DnsServer(zones, host="127.0.0.1") as dns:
        cfg = config_from_dict(
            {
                "server": {"hostname": "backup.example.test", "listen": ["0.0.0.0:2999"]},
                "domains": [{"name": "example.test"}],
                "dns": {"nameservers": [dns.nameserver], "timeout": "2s"},
            }
        )
        r = RouteResolver(cfg)
        route = await r.resolve("example.test")
        assert route.source is RouteSource.MX
        assert route.targets == (Target("mx1.example.test", 25, "127.0.0.1"),)
        implicit = await r.resolve("sender.test")  # no MX: the domain's own address
        assert implicit.source is RouteSource.IMPLICIT and implicit.targets[0].address == "127.0.0.2"
        nx = await r.resolve("nowhere.example.test")
        assert nx.failure is not None and nx.failure.status == "5.1.2"
        dns.fail("example.test", "MX")
        again = await r.resolve("example.test")
        assert again.source is RouteSource.CACHED and again.targets == route.targets
