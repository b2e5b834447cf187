"""tests/support/dnsserver.py behaves like an authoritative server, over UDP and TCP, and misbehaves
on request. Other suites (MX routing, SPF) rely on this."""

from __future__ import annotations

import socket
import time

import dns.flags
import dns.message
import dns.nameserver
import dns.query
import dns.rcode
import dns.resolver
import pytest

from tests.support.dnsserver import DnsServer, build_zone

ZONES = {
    "example.test": {
        "@": {"NS": ["ns1", "ns2.other.test."], "MX": ["10 mx1", "20 mx2.other.test."]},
        "mx1": {"A": "127.1.0.1", "AAAA": "2001:db8::1"},
        "ns1": {"A": "127.3.0.53"},
        "www": {"CNAME": "alias"},
        "alias": {"CNAME": "mx1"},
        "outside": {"CNAME": "somewhere.else.invalid."},
        "sub": {"NS": "ns.sub"},
        "ns.sub": {"A": "127.9.0.53"},
        "$TTL": 60,
    },
    "other.test": "@ IN NS ns2\nns2 IN A 127.4.0.53\nmx2 120 IN A 127.2.0.1\n"
    "big IN TXT " + " ".join([f'"{"x" * 200}"'] * 12) + "\n",
}


def resolver_for(server: DnsServer) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [dns.nameserver.Do53Nameserver(server.host, server.port)]
    r.lifetime = 2.0
    return r


def ask(server: DnsServer, name: str, rdtype: str, *, tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(q, server.host, port=server.port, timeout=2)
    return dns.query.udp(q, server.host, port=server.port, timeout=2)


@pytest.fixture
def server() -> DnsServer:
    with DnsServer(ZONES) as s:
        yield s  # type: ignore[misc]


def test_answers_with_ttl_and_authority_flags(server: DnsServer) -> None:
    for tcp in (False, True):
        m = ask(server, "example.test", "MX", tcp=tcp)
        assert m.rcode() == dns.rcode.NOERROR
        assert m.flags & dns.flags.AA and not m.flags & dns.flags.RA
        assert sorted(r.to_text() for r in m.answer[0]) == ["10 mx1.example.test.", "20 mx2.other.test."]
        assert m.answer[0].ttl == 60
    assert resolver_for(server).resolve("mx2.other.test", "A").rrset.ttl == 120  # type: ignore[union-attr]


def test_nxdomain_and_nodata_carry_the_soa(server: DnsServer) -> None:
    nx = ask(server, "nope.example.test", "A")
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.authority[0].rdtype == dns.rdatatype.SOA
    nodata = ask(server, "mx1.example.test", "MX")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0].name.to_text() == "example.test."
    assert resolver_for(server).resolve("mx1.example.test", "AAAA")[0].to_text() == "2001:db8::1"


def test_cname_chains_are_followed_inside_our_zones(server: DnsServer) -> None:
    answer = resolver_for(server).resolve("www.example.test", "A")
    assert answer[0].to_text() == "127.1.0.1"
    assert answer.canonical_name.to_text() == "mx1.example.test."
    m = ask(server, "outside.example.test", "A")  # a CNAME out of our zones: the answer stops there
    assert m.rcode() == dns.rcode.NOERROR and len(m.answer) == 1


def test_referral_below_a_delegation(server: DnsServer) -> None:
    m = ask(server, "host.sub.example.test", "A")
    assert m.rcode() == dns.rcode.NOERROR and not m.answer and not m.flags & dns.flags.AA
    assert m.authority[0].name.to_text() == "sub.example.test." and m.authority[0].rdtype == dns.rdatatype.NS
    assert [r.to_text() for r in m.additional[0]] == ["127.9.0.53"]  # glue


def test_out_of_zone_is_refused(server: DnsServer) -> None:
    assert ask(server, "example.org", "A").rcode() == dns.rcode.REFUSED


def test_zone_for_name_works_through_it(server: DnsServer) -> None:
    r = resolver_for(server)
    assert dns.resolver.zone_for_name("mx1.example.test", resolver=r).to_text() == "example.test."
    assert dns.resolver.zone_for_name("a.b.mx2.other.test", resolver=r).to_text() == "other.test."


def test_large_answers_are_truncated_over_udp_and_complete_over_tcp(server: DnsServer) -> None:
    q = dns.message.make_query("big.other.test", "TXT")  # no EDNS: 512 bytes at most over UDP
    udp = dns.query.udp(q, server.host, port=server.port, timeout=2)
    assert udp.flags & dns.flags.TC and not udp.answer
    answer = resolver_for(server).resolve("big.other.test", "TXT")
    assert len(answer[0].strings) == 12
    assert [q.transport for q in server.queries if q.qname == "big.other.test"][-2:] == ["udp", "tcp"]


def test_force_tcp() -> None:
    with DnsServer(ZONES, force_tcp=True) as s:
        assert resolver_for(s).resolve("mx1.example.test", "A")[0].to_text() == "127.1.0.1"
        assert {q.transport for q in s.queries} == {"udp", "tcp"}


def test_faults_fail_drop_delay_and_clear(server: DnsServer) -> None:
    server.fail("example.test", "MX")
    assert ask(server, "example.test", "MX").rcode() == dns.rcode.SERVFAIL
    assert ask(server, "example.test", "NS").rcode() == dns.rcode.NOERROR  # only the MX type
    server.fail("mx1.example.test", rcode="REFUSED")
    assert ask(server, "mx1.example.test", "AAAA").rcode() == dns.rcode.REFUSED
    server.drop("ns1.example.test")
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(dns.message.make_query("ns1.example.test", "A"), server.host, port=server.port, timeout=0.5)
    server.delay("mx2.other.test", 0.3)
    t0 = time.monotonic()
    assert ask(server, "mx2.other.test", "A").answer
    assert time.monotonic() - t0 >= 0.3
    server.clear_faults()
    assert ask(server, "example.test", "MX").answer
    assert server.queried("example.test", "MX") == 2


def test_zones_change_while_running(server: DnsServer) -> None:
    server.set_zone("example.test", {"@": {"MX": "5 new.example.test."}})
    assert [r.to_text() for r in ask(server, "example.test", "MX").answer[0]] == ["5 new.example.test."]
    server.remove_zone("other.test")
    assert ask(server, "mx2.other.test", "A").rcode() == dns.rcode.REFUSED


def test_two_servers_on_distinct_loopback_addresses() -> None:
    with (
        DnsServer(ZONES, host="127.0.0.54") as a,
        DnsServer({"solo.test": {"@": {"A": "127.0.0.9"}}}, host="127.0.0.55") as b,
    ):
        assert a.nameserver.startswith("127.0.0.54:") and b.nameserver.startswith("127.0.0.55:")
        assert ask(b, "solo.test", "A").answer and ask(a, "solo.test", "A").rcode() == dns.rcode.REFUSED


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with DnsServer(ZONES, host="::1") as s:
        assert s.nameserver.startswith("[::1]:")
        assert ask(s, "mx1.example.test", "A").answer
        assert ask(s, "mx1.example.test", "A", tcp=True).answer


def test_stop_releases_the_port() -> None:
    s = DnsServer(ZONES).start()
    port = s.port
    s.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((s.host, port))


def test_build_zone_adds_an_soa_but_never_ns() -> None:
    z = build_zone("bare.test", {"@": {"A": "127.0.0.1"}})
    assert z.get_rdataset("bare.test.", "SOA") is not None
    assert z.get_rdataset("bare.test.", "NS") is None


def test_secure_zones_answer_with_the_ad_bit() -> None:
    with DnsServer(ZONES) as server:
        server.secure("example.test")
        r = resolver_for(server)
        assert r.resolve("mx1.example.test", "A").response.flags & dns.flags.AD
        assert not r.resolve("mx2.other.test", "A").response.flags & dns.flags.AD
