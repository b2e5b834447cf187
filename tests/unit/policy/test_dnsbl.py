"""DNSBL at connect against a local authoritative DNS server: listed, not listed, IPv6 nibbles, several
zones, and every DNS failure (SERVFAIL, REFUSED, silence, the 127.255.255.x error answers) skips."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from backupmx.config import config_from_dict
from backupmx.policy import Action, SessionInfo, Stage
from backupmx.policy.dnsbl import DnsblCheck, query_name
from tests.support.dnsserver import DnsServer

V6 = "2001:db8::1"
V6_NAME = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"


@pytest.fixture
def dnsd() -> Iterator[DnsServer]:
    zones = {
        "bl.test": {
            "2.0.0.127": {"A": "127.0.0.2", "TXT": '"listed, see https://bl.test/"'},
            "9.2.0.192": {"A": "127.0.0.10"},
            V6_NAME: {"A": "127.0.0.4"},
            "7.2.0.192": {"A": "127.255.255.254"},  # "you query us through a public resolver"
            "8.2.0.192": {"A": "192.0.2.99"},
        },  # not a 127/8 answer: not a listing
        "other.test": {"3.0.0.127": {"A": "127.0.0.2"}},
        "slow.test": {"2.0.0.127": {"A": "127.0.0.2"}},
    }
    with DnsServer(zones) as server:
        yield server


def check(dnsd: DnsServer, *zones: str, timeout: str = "1s") -> DnsblCheck:
    cfg = config_from_dict(
        {"policy": {"dnsbl": list(zones)}, "dns": {"nameservers": [dnsd.nameserver], "timeout": timeout}}
    )
    chk = DnsblCheck.from_config(cfg)
    assert chk is not None
    return chk


async def connect(chk: DnsblCheck, ip: str) -> tuple[str, str]:
    v = await chk.check(Stage.CONNECT, SessionInfo(client_ip=ip), None)
    return ("ok", "") if v.action is Action.CONTINUE else (str(v.reply), v.log_reason)


def test_query_names() -> None:
    assert query_name("192.0.2.1", "bl.test") == "1.2.0.192.bl.test"
    assert query_name("::ffff:192.0.2.1", "bl.test") == "1.2.0.192.bl.test"
    assert query_name(V6, "bl.test") == f"{V6_NAME}.bl.test"
    assert query_name("unknown", "bl.test") is None


def test_not_configured() -> None:
    assert DnsblCheck.from_config(config_from_dict({})) is None


async def test_listed_client_gets_554_zone_only_in_log(dnsd: DnsServer) -> None:
    chk = check(dnsd, "bl.test")
    reply, reason = await connect(chk, "127.0.0.2")
    assert reply == "554 5.7.1 Service unavailable; Client host [127.0.0.2] blocked"
    assert "bl.test" not in reply and reason == "dnsbl bl.test"
    assert await connect(chk, "127.0.0.3") == ("ok", "")
    assert (await connect(chk, "192.0.2.9"))[0].startswith("554")  # any 127/8 answer means listed
    assert (await connect(chk, V6))[0] == f"554 5.7.1 Service unavailable; Client host [{V6}] blocked"
    assert await connect(chk, "unknown") == ("ok", "")


async def test_several_zones(dnsd: DnsServer) -> None:
    chk = check(dnsd, "bl.test", "other.test")
    assert await chk.listed_in("127.0.0.2") == ["bl.test"]
    assert await chk.listed_in("127.0.0.3") == ["other.test"]
    assert (await connect(chk, "127.0.0.3"))[1] == "dnsbl other.test"


async def test_error_answers_are_not_listings(dnsd: DnsServer) -> None:
    chk = check(dnsd, "bl.test")
    assert await connect(chk, "192.0.2.7") == ("ok", "")
    assert await connect(chk, "192.0.2.8") == ("ok", "")


@pytest.mark.parametrize("fault", ["SERVFAIL", "REFUSED", "drop"])
async def test_dns_failures_skip_the_zone(dnsd: DnsServer, fault: str) -> None:
    chk = check(dnsd, "slow.test", "other.test", timeout="1s")
    if fault == "drop":
        dnsd.drop("2.0.0.127.slow.test")
        dnsd.drop("3.0.0.127.other.test")
    else:
        dnsd.fail("2.0.0.127.slow.test", rcode=fault)
        dnsd.fail("3.0.0.127.other.test", rcode=fault)
    t0 = time.monotonic()
    assert await connect(chk, "127.0.0.2") == ("ok", "")
    assert await connect(chk, "127.0.0.3") == ("ok", "")
    assert time.monotonic() - t0 < 4.0  # zones are asked at once, each bounded by [dns] timeout


async def test_no_server_at_all() -> None:
    cfg = config_from_dict({"policy": {"dnsbl": ["bl.test"]}, "dns": {"nameservers": ["127.0.0.1:1"], "timeout": "1s"}})
    chk = DnsblCheck.from_config(cfg)
    assert chk is not None
    assert await connect(chk, "127.0.0.2") == ("ok", "")
