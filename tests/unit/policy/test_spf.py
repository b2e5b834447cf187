"""SPF for the trust hand-off: pyspf over a local authoritative DNS server (pass, fail, softfail, neutral,
none, temperror, permerror, the HELO identity of <>), the Authentication-Results field, and the filter that
renames incoming fields claiming our authserv-id (RFC 8601 §5), fed in every possible split."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from backupmx.config import DnsConfig, config_from_dict
from backupmx.policy import SessionInfo
from backupmx.policy.spf import (
    ForgedResultsFilter,
    SpfChecker,
    SpfResult,
    SpfStamp,
    authentication_results,
    authserv_id_of,
)
from tests.support.dnsserver import DnsServer

pytest.importorskip("spf")

ZONES = {
    "pass.test": {"@": {"TXT": '"v=spf1 ip4:127.0.0.2 -all"'}},
    "soft.test": {"@": {"TXT": '"v=spf1 ip4:127.0.0.2 ~all"'}},
    "neutral.test": {"@": {"TXT": '"v=spf1 ?all"'}},
    "nospf.test": {"@": {"TXT": '"hello world"', "A": "127.0.0.9"}},
    "broken.test": {"@": {"TXT": '"v=spf1 ip4:127.0.0.n -all"'}},
    "incl.test": {"@": {"TXT": '"v=spf1 include:pass.test -all"'}},
    "mx.test": {"@": {"TXT": '"v=spf1 a:mail.mx.test -all"'}, "mail": {"A": "127.0.0.3"}},
    "helo.test": {"@": {"TXT": '"v=spf1 ip4:127.0.0.3 -all"'}},
    "dead.test": {"@": {"TXT": '"v=spf1 ip4:127.0.0.2 -all"'}},
}


@pytest.fixture(scope="module")
def dnsd() -> Iterator[DnsServer]:
    with DnsServer(ZONES) as server:
        server.fail("dead.test", rcode="SERVFAIL")
        yield server


@pytest.fixture
async def checker(dnsd: DnsServer) -> AsyncIterator[SpfChecker]:
    c = SpfChecker(DnsConfig(nameservers=(dnsd.nameserver,), timeout="1s"))  # type: ignore[arg-type]
    yield c
    c.close()


@pytest.mark.parametrize(
    ("ip", "sender", "helo", "result"),
    [
        ("127.0.0.2", "alice@pass.test", "client.test", "pass"),
        ("127.0.0.3", "alice@pass.test", "client.test", "fail"),
        ("127.0.0.3", "alice@soft.test", "client.test", "softfail"),
        ("127.0.0.3", "alice@neutral.test", "client.test", "neutral"),
        ("127.0.0.3", "alice@nospf.test", "client.test", "none"),
        ("127.0.0.3", "alice@nxdomain.pass.test", "client.test", "none"),
        ("127.0.0.3", "alice@outside.test", "client.test", "temperror"),  # our DNS server refuses it
        ("127.0.0.2", "alice@broken.test", "client.test", "permerror"),
        ("127.0.0.2", "alice@incl.test", "client.test", "pass"),
        ("127.0.0.3", "alice@mx.test", "client.test", "pass"),
        ("127.0.0.2", "alice@dead.test", "client.test", "temperror"),
        ("127.0.0.3", "", "helo.test", "pass"),
        ("127.0.0.2", "", "helo.test", "fail"),
        ("127.0.0.2", "", "[127.0.0.2]", "none"),
        ("127.0.0.2", "alice@[127.0.0.2]", "client.test", "none"),
        ("unknown", "alice@pass.test", "client.test", "none"),
    ],
)
async def test_results(checker: SpfChecker, ip: str, sender: str, helo: str, result: str) -> None:
    got = await checker.check(ip, sender, helo)
    assert got.result == result, got
    assert got.identity == ("mailfrom" if sender else "helo")


async def test_silent_dns_is_temperror_within_the_budget(dnsd: DnsServer, checker: SpfChecker) -> None:
    dnsd.drop("silent.test")
    got = await checker.check("127.0.0.2", "alice@silent.test", "client.test")
    assert got.result == "temperror"


def test_header_text() -> None:
    assert authentication_results("backup.example.net", SpfResult("pass", "mailfrom", "sender@example.org")) == (
        b"Authentication-Results: backup.example.net; spf=pass smtp.mailfrom=sender@example.org\r\n"
    )
    assert authentication_results("backup.test", SpfResult("none", "helo", "client.test")) == (
        b"Authentication-Results: backup.test; spf=none smtp.helo=client.test\r\n"
    )
    long = authentication_results("backup.example.net", SpfResult("softfail", "mailfrom", "x" * 64 + "@" + "d" * 950))
    assert long == (
        b"Authentication-Results: backup.example.net;\r\n\tspf=softfail smtp.mailfrom="
        + b"x" * 64
        + b"@"
        + b"d" * 950
        + b"\r\n"
    )


async def test_stamp(dnsd: DnsServer) -> None:
    cfg = config_from_dict(
        {
            "server": {"hostname": "backup.test"},
            "policy": {"spf": True},
            "dns": {"nameservers": [dnsd.nameserver], "timeout": "1s"},
        }
    )
    stamp = SpfStamp.from_config(cfg)
    assert stamp is not None and stamp.authserv_id == "backup.test"
    try:
        got = await stamp.stamp(SessionInfo(client_ip="127.0.0.2", helo="c.test", sender="a@pass.test"))
        assert got.headers == b"Authentication-Results: backup.test; spf=pass smtp.mailfrom=a@pass.test\r\n"
        assert isinstance(got.filter, ForgedResultsFilter)
    finally:
        stamp.close()
    assert SpfStamp.from_config(config_from_dict({})) is None
    other = SpfStamp.from_config(config_from_dict({"policy": {"spf": True, "authserv_id": "mx.example"}}))
    assert other is not None and other.authserv_id == "mx.example"
    other.close()


@pytest.mark.parametrize(
    ("field", "ident"),
    [
        (b"Authentication-Results: backup.test; spf=pass\r\n", "backup.test"),
        (b"authentication-results:BACKUP.TEST.;spf=pass\r\n", "backup.test"),
        (b"Authentication-Results: (a (nested) comment) backup.test 1; spf=pass\r\n", "backup.test"),
        (b"Authentication-Results:\r\n  backup.test;\r\n  spf=pass\r\n", "backup.test"),
        (b'Authentication-Results: "backup.test"; none\r\n', "backup.test"),
        (b"Authentication-Results: other.test; spf=pass (backup.test says)\r\n", "other.test"),
        (b"Authentication-Results: backup.test.evil; spf=pass\r\n", "backup.test.evil"),
    ],
)
def test_authserv_id_of(field: bytes, ident: str) -> None:
    assert authserv_id_of(field) == ident


MESSAGE = (
    b"Authentication-Results: backup.test; spf=pass smtp.mailfrom=ceo@bank.test\r\n"
    b"Received: from a by b; Mon, 1 Jan 2026 00:00:00 +0000\r\n"
    b"Authentication-Results: other.test; dkim=pass\r\n"
    b"AUTHENTICATION-RESULTS :\r\n (forged, folded)\r\n\tBackup.Test; dmarc=pass\r\n"
    b"X-Authentication-Results: backup.test; spf=pass\r\n"
    b"Authentication-Results-Extra: backup.test\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Authentication-Results: backup.test; this is the body, left alone\r\n"
)
FILTERED = (
    b"X-Forged-Authentication-Results: backup.test; spf=pass smtp.mailfrom=ceo@bank.test\r\n"
    b"Received: from a by b; Mon, 1 Jan 2026 00:00:00 +0000\r\n"
    b"Authentication-Results: other.test; dkim=pass\r\n"
    b"X-Forged-Authentication-Results :\r\n (forged, folded)\r\n\tBackup.Test; dmarc=pass\r\n"
    b"X-Authentication-Results: backup.test; spf=pass\r\n"
    b"Authentication-Results-Extra: backup.test\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Authentication-Results: backup.test; this is the body, left alone\r\n"
)


def run(f: ForgedResultsFilter, chunks: list[bytes]) -> bytes:
    return b"".join(f.feed(c) for c in chunks) + f.finish()


def test_filter_renames_only_our_id_in_the_header_section() -> None:
    f = ForgedResultsFilter("backup.test")
    assert run(f, [MESSAGE]) == FILTERED
    assert f.renamed == 2


def test_filter_every_split() -> None:
    for cut in range(len(MESSAGE) + 1):
        assert run(ForgedResultsFilter("backup.test"), [MESSAGE[:cut], MESSAGE[cut:]]) == FILTERED, cut
    assert run(ForgedResultsFilter("backup.test"), [bytes([b]) for b in MESSAGE]) == FILTERED


def test_filter_edge_cases() -> None:
    f = ForgedResultsFilter("backup.test")
    # a message that ends inside its header section, the last field without CRLF
    assert run(f, [b"Subject: x\r\nAuthentication-Results: backup.test; spf=pass"]) == (
        b"Subject: x\r\nX-Forged-Authentication-Results: backup.test; spf=pass"
    )
    assert run(ForgedResultsFilter("backup.test"), [b""]) == b""
    clean = b"Subject: x\r\n\r\nbody\r\n"
    assert run(ForgedResultsFilter("backup.test"), [clean]) == clean


def test_filter_memory_is_bounded() -> None:
    f = ForgedResultsFilter("backup.test", max_field=100)
    huge = b"Authentication-Results: backup.test;" + b" x" * 500 + b"\r\n"
    out = f.feed(huge[:300])
    assert out.startswith(b"X-Forged-Authentication-Results: backup.test;") and len(f._buf) == 0
    out += f.feed(huge[300:] + b"Subject: s\r\n\r\nbody")
    assert out + f.finish() == b"X-Forged-" + huge + b"Subject: s\r\n\r\nbody"
    folded = b"Authentication-Results: other.test;\r\n" + b" x\r\n" * 100 + b"\r\n"
    g = ForgedResultsFilter("backup.test", max_field=100)
    assert run(g, [folded]) == folded and g.renamed == 0
