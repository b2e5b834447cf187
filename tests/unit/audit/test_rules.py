"""The audit's rules as a table: views in, (check, level, subject) out, without sockets."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backupmx.audit import rules
from backupmx.audit.report import (
    Address,
    CertInfo,
    DnsView,
    Host,
    Level,
    MxRecord,
    RcptTest,
    Role,
    SmtpProbe,
    TlsInfo,
    ZoneView,
)
from backupmx.audit.rules import CHECK_IDS, distance, dns_marks, node_marks, site_marks, smtp_marks
from backupmx.config import config_from_dict
from backupmx.reply import Reply

OK, INFO, WARN, FAIL = Level.OK, Level.INFO, Level.WARN, Level.FAIL
NOW = datetime(2026, 6, 1, tzinfo=UTC)


def host(name: str, *ips: str, **kw: Any) -> Host:
    return Host(name, tuple(Address(ip, 300) for ip in ips), **kw)


def view(
    *mx: tuple[int, Host],
    ns: tuple[Host, ...] = (),
    zones: dict[str, tuple[Host, ...]] | None = None,
    zone_of: dict[str, str] | None = None,
) -> DnsView:
    best = min(p for p, _ in mx) if mx else 0
    records = tuple(MxRecord(p, h, 300, Role.PRIMARY if p == best else Role.BACKUP) for p, h in mx)
    return DnsView(
        "example.test",
        "test",
        records,
        ns=ns,
        zone_of=zone_of or {},
        zones={z: ZoneView(z, hs) for z, hs in (zones or {}).items()},
    )


def marks(found: list[Any], prefix: str = "") -> set[tuple[str, Level, str]]:
    return {(m.check, m.level, m.subject) for m in found if m.check.startswith(prefix)}


@pytest.mark.parametrize(
    ("ip", "others", "expected"),
    [
        ("192.0.2.10", ["192.0.2.20"], (0, "192.0.2.0/24", "192.0.2.20")),
        ("192.0.2.10", ["192.0.9.20"], (1, "192.0.0.0/16", "192.0.9.20")),
        ("192.0.2.10", ["198.51.100.1"], (2, None, None)),
        ("192.0.2.10", ["192.0.9.20", "192.0.2.99"], (0, "192.0.2.0/24", "192.0.2.99")),  # the nearest wins
        ("2001:db8:1:2::1", ["2001:db8:1:3::1"], (0, "2001:db8:1::/48", "2001:db8:1:3::1")),
        ("2001:db8:1::1", ["2001:db8:2::1"], (1, "2001:db8::/32", "2001:db8:2::1")),
        ("2001:db8::1", ["2001:db9::1"], (2, None, None)),
        ("192.0.2.10", ["2001:db8::1"], (2, None, None)),  # families never share a network
    ],
)
def test_distance(ip: str, others: list[str], expected: tuple[int, str | None, str | None]) -> None:
    assert distance(ip, others) == expected


@pytest.mark.parametrize(
    ("backup_ips", "level"),
    [
        (("2001:db8:1:2::1",), FAIL),  # same /48 as the primary
        (("2001:db8:2::1",), WARN),  # same /32
        (("2001:db9::1",), OK),
        (("192.0.2.2", "198.51.100.7"), OK),  # one address in the primary's /24, one far away: it survives
        (("192.0.2.2", "192.0.77.7"), WARN),  # its farthest address is still in the primary's /16
        (("192.0.2.2",), FAIL),
    ],
)
def test_site_backup_judges_a_backup_by_its_farthest_address(backup_ips: tuple[str, ...], level: Level) -> None:
    v = view((10, host("mx1.example.test", "192.0.2.1", "2001:db8:1::1")), (20, host("mx2.example.test", *backup_ips)))
    assert marks(site_marks(v), "site.backup") == {("site.backup", level, "mx2.example.test")}


def test_distinct_fails_when_backups_resolve_only_to_primary_addresses() -> None:
    v = view((10, host("mx1.example.test", "192.0.2.1", "192.0.2.2")), (20, host("mx2.example.test", "192.0.2.2")))
    assert ("mx.distinct", FAIL, "example.test") in marks(dns_marks(v))


def test_site_ns_unknown_when_ns_lookup_failed() -> None:
    v = view((10, host("mx1.example.test", "192.0.2.1")), (20, host("mx2.example.test", "198.51.100.1")))
    v = DnsView(v.domain, v.resolver, v.mx, ns_error="DNS timeout")
    assert marks(site_marks(v), "site.ns") == {("site.ns", WARN, "example.test")}


def test_site_ns_ok_when_one_nameserver_is_outside() -> None:
    ns = (host("ns1.example.test", "192.0.2.53"), host("ns2.other.test", "203.0.113.53"))
    v = view(
        (10, host("mx1.example.test", "192.0.2.1")),
        (20, host("mx2.example.test", "198.51.100.1")),
        ns=ns,
        zones={"other.test": (host("ns.other.test", "203.0.113.1"),)},
        zone_of={"ns2.other.test": "other.test"},
    )
    assert marks(site_marks(v), "site.ns") == {("site.ns", OK, "example.test")}


def test_mx_zone_with_a_single_nameserver_is_one_network() -> None:
    v = view(
        (10, host("mx1.example.test", "192.0.2.1")),
        (20, host("mx2.backup.test", "198.51.100.1")),
        zones={
            "example.test": (host("ns1", "203.0.113.1"), host("ns2", "198.18.0.1")),
            "backup.test": (host("ns.backup.test", "198.51.100.53"),),
        },
        zone_of={"mx1.example.test": "example.test", "mx2.backup.test": "backup.test"},
    )
    assert marks(site_marks(v), "site.mx-zone") == {
        ("site.mx-zone", OK, "example.test"),
        ("site.mx-zone", WARN, "backup.test"),
    }


CFG_MX = {"name": "example.test"}
CFG_HOSTS = {"name": "example.test", "primary": ["mx1.example.test:25"]}


@pytest.mark.parametrize(
    ("records", "domain", "level"),
    [
        ([(10, "mx1.example.test"), (20, "backup.example.test")], CFG_MX, OK),
        ([(10, "mx1.example.test"), (10, "backup.example.test")], CFG_MX, FAIL),  # RFC 5321 §5.1: no route
        ([(10, "mx1.example.test"), (10, "backup.example.test")], CFG_HOSTS, WARN),  # a route, but half the mail
        ([(10, "backup.example.test"), (20, "mx1.example.test")], CFG_MX, FAIL),  # better than the primary
        ([(10, "backup.example.test")], CFG_MX, FAIL),  # the only MX
        ([(10, "mx1.example.test")], CFG_MX, FAIL),  # not an MX at all
    ],
)
def test_node_mx(records: list[tuple[int, str]], domain: dict[str, Any], level: Level) -> None:
    v = view(*((p, host(n, "192.0.2.1")) for p, n in records))
    cfg = config_from_dict({"server": {"hostname": "Backup.Example.Test."}, "domains": [domain]})
    assert marks(node_marks(v, cfg), "node.mx") == {("node.mx", level, "backup.example.test")}


def test_node_domain_missing() -> None:
    v = view((10, host("mx1.example.test", "192.0.2.1")))
    cfg = config_from_dict({"server": {"hostname": "b.example.test"}, "domains": [{"name": "other.test"}]}, "x.toml")
    found = node_marks(v, cfg)
    assert ("node.domain", FAIL, "example.test") in marks(found)
    assert "x.toml" in next(m.text for m in found if m.check == "node.domain")


def cert(*, days_left: float, self_signed: bool = False) -> CertInfo:
    return CertInfo(
        "CN=mx.example.test",
        "CN=mx.example.test" if self_signed else "CN=CA",
        NOW - timedelta(days=30),
        NOW + timedelta(days=days_left),
        self_signed,
    )


def probe(**kw: Any) -> SmtpProbe:
    base: dict[str, Any] = dict(
        host="mx.example.test",
        address="192.0.2.1",
        port=25,
        role=Role.BACKUP,
        banner=Reply(220, "", "mx.example.test ESMTP"),
        ehlo=Reply(250, "", "mx.example.test\nSTARTTLS"),
        starttls_offered=True,
        starttls=Reply(220, "", "go"),
        tls=TlsInfo("TLSv1.3", "X", cert(days_left=60), True),
        rcpts=(
            RcptTest("postmaster", "", "postmaster@example.test", Reply(250, "", ""), Reply(250, "", "")),
            RcptTest("unknown", "", "x@example.test", Reply(250, "", ""), Reply(550, "5.1.1", "no")),
            RcptTest("relay", "", "r@example.net", Reply(250, "", ""), Reply(554, "5.7.1", "no")),
        ),
    )
    base.update(kw)
    return SmtpProbe(**base)


def rcpt(kind: str, code: int) -> RcptTest:
    return RcptTest(kind, "", f"{kind}@example.test", Reply(250, "", ""), Reply(code, "", "x"))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, set()),
        ({"tls": TlsInfo("TLSv1.3", "X", cert(days_left=5), True)}, {("smtp.tls-cert", WARN)}),  # expires soon
        (
            {"tls": TlsInfo("TLSv1.3", "X", cert(days_left=-1), False, "certificate has expired")},
            {("smtp.tls-cert", WARN)},
        ),
        (
            {"tls": TlsInfo("TLSv1.3", "X", cert(days_left=60), False, "unable to get local issuer certificate")},
            {("smtp.tls-cert", WARN)},
        ),
        ({"tls": TlsInfo("TLSv1.3", "X", None, True)}, {("smtp.tls-cert", WARN)}),
        ({"starttls": Reply(454, "4.7.0", "TLS not available")}, {("smtp.starttls", FAIL)}),
        ({"tls": None, "tls_error": "wrong version number"}, {("smtp.starttls", FAIL)}),
        ({"rcpts": (rcpt("postmaster", 450),)}, {("smtp.postmaster", WARN)}),
        ({"rcpts": (rcpt("postmaster", 550),)}, {("smtp.postmaster", FAIL)}),
        (
            {"rcpts": (RcptTest("postmaster", "", "postmaster@example.test", Reply(451, "4.3.0", "later"), None),)},
            {("smtp.postmaster", WARN)},
        ),
        (
            {"rcpts": (RcptTest("postmaster", "", "postmaster@example.test", Reply(550, "5.7.1", "no"), None),)},
            {("smtp.postmaster", FAIL)},
        ),
        ({"rcpts": (rcpt("unknown", 450),)}, set()),  # a deferral makes no backscatter
        ({"rcpts": (rcpt("unknown", 250),)}, {("smtp.unknown-user", WARN)}),
        ({"rcpts": (rcpt("unknown", 250),), "role": Role.PRIMARY}, {("smtp.unknown-user", INFO)}),
        ({"rcpts": (rcpt("relay", 250),)}, {("smtp.relay", FAIL)}),
        ({"rcpts": (rcpt("relay", 451),)}, set()),
        ({"null_sender_refused": Reply(550, "5.7.1", "no bounces")}, {("smtp.null-sender", FAIL)}),
        ({"error": "connection closed by the server"}, {("smtp.session", FAIL)}),
        ({"ehlo": Reply(502, "5.5.1", "no")}, {("smtp.ehlo", FAIL)}),
        ({"banner": Reply(554, "5.7.1", "go away")}, {("smtp.connect", FAIL)}),
        ({"banner": None, "error": "connect: Connection refused"}, {("smtp.connect", FAIL)}),
        ({"skipped": "no IPv6 route from here"}, {("smtp.connect", INFO)}),
    ],
)
def test_smtp_marks(changes: dict[str, Any], expected: set[tuple[str, Level]]) -> None:
    found = smtp_marks(probe(**changes), NOW)
    assert {(m.check, m.level) for m in found if m.level is not OK} == expected
    assert all(m.subject == "mx.example.test [192.0.2.1]" for m in found)
    assert all(m.hint for m in found if m.level in (WARN, FAIL))


def test_every_check_id_is_listed_and_explained() -> None:
    source = "".join(f.read_text() for f in Path(rules.__file__).parent.glob("*.py"))
    assert set(re.findall(r'Mark\(\s*"([a-z.-]+)"', source)) == set(CHECK_IDS)
    docs = (Path(__file__).resolve().parents[3] / "docs" / "check.md").read_text()
    missing = [cid for cid in CHECK_IDS if f"| `{cid}` |" not in docs]
    assert missing == []
