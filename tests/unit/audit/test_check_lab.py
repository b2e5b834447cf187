"""`check` against the lab: one case per risk the audit must see, each yielding exactly its marks.

Every case runs the real audit (DNS over UDP/TCP to tests/support/dnsserver.py, SMTP to aiosmtpd
servers on distinct 127.x addresses, STARTTLS with openssl-made certificates) and asserts the whole
set of (check id, level) pairs, the subjects of every mark that is not ok, and that the audit never
sent DATA and ended every session with RSET and QUIT.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from backupmx.audit import render_text, run_check
from backupmx.audit.report import CheckReport, Level
from tests.unit.audit.lab import KNOWN_USERS, Lab, Pki, node_config, problems, two_mx, worst_lab, zone

OK, INFO, WARN, FAIL = Level.OK, Level.INFO, Level.WARN, Level.FAIL
SMTP_OK = {
    ("smtp.connect", OK),
    ("smtp.ehlo", OK),
    ("smtp.starttls", OK),
    ("smtp.tls-cert", OK),
    ("smtp.postmaster", OK),
    ("smtp.unknown-user", OK),
    ("smtp.relay", OK),
}
# every lab check has the lab's ASN file and a TLS-RPT record, and no MTA-STS or TLSA unless a case adds them
POLICY_OK = {("site.asn", OK), ("site.prefix", OK), ("sts.policy", OK), ("dane.tlsa", OK), ("tlsrpt.record", OK)}
HEALTHY = (
    {
        ("mx.records", OK),
        ("mx.count", OK),
        ("mx.address", OK),
        ("mx.distinct", OK),
        ("site.backup", OK),
        ("site.ns", OK),
        ("site.mx-zone", OK),
    }
    | SMTP_OK
    | POLICY_OK
)


async def audit(lab: Lab, domain: str, **kw: Any) -> CheckReport:
    report = await lab.check(domain, **kw)
    lab.assert_clean_sessions()
    return report


def capture(name: str, report: CheckReport) -> None:
    """BACKUPMX_CAPTURE_DIR=DIR keeps the text report of a case: docs/check.md shows two of them."""
    target = os.environ.get("BACKUPMX_CAPTURE_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / f"{name}.txt").write_text(render_text(report))


def subject(host: str, ip: str) -> str:
    return f"{host} [{ip}]"


async def test_healthy_setup_has_no_warning_and_no_failure(pki: Pki) -> None:
    lab = Lab(pki, two_mx("healthy.test"))
    lab.mx("mx1.healthy.test", "127.1.0.1", domains={"healthy.test"})
    lab.mx("mx2.healthy.test", "127.2.0.1", domains={"healthy.test"})
    with lab:
        report = await audit(lab, "healthy.test")
    capture("healthy", report)
    assert report.pairs() == HEALTHY
    assert problems(report) == set()
    assert report.exit_code == 0 and report.strict_exit_code == 0
    assert [(r.preference, r.host.name, r.role.value, r.host.ips) for r in report.dns.mx] == [
        (10, "mx1.healthy.test", "primary", ("127.1.0.1",)),
        (20, "mx2.healthy.test", "backup", ("127.2.0.1",)),
    ]
    assert all(r.ttl == 300 for r in report.dns.mx)
    assert {h.name for h in report.dns.ns} == {"ns1.dns-one.test", "ns2.dns-two.test"}
    backup = next(p for p in report.smtp if p.host == "mx2.healthy.test")
    assert backup.tls is not None and backup.tls.verified and backup.tls.cert is not None
    assert backup.tls.cert.subject == "CN=mx2.healthy.test"
    assert backup.tls.cert.issuer == "O=backupmx lab, CN=backupmx lab CA"
    assert "STARTTLS" in backup.extensions
    assert [(t.kind, t.reply.code if t.reply else None) for t in backup.rcpts] == [
        ("postmaster", 250),
        ("unknown", 550),
        ("relay", 554),
    ]
    assert all(t.mail_from == "" for t in backup.rcpts)  # the null sender, so nothing could bounce anywhere


async def test_single_mx(pki: Pki) -> None:
    lab = Lab(pki, {"single.test": zone(["10 mx1"], {"mx1": "127.1.0.1"})})
    lab.mx("mx1.single.test", "127.1.0.1", domains={"single.test"})
    with lab:
        report = await audit(lab, "single.test")
    assert problems(report) == {("mx.count", FAIL, "single.test")}
    assert report.pairs() == HEALTHY - {
        ("mx.count", OK),
        ("mx.distinct", OK),
        ("site.backup", OK),
        ("site.asn", OK),
        ("site.prefix", OK),
    } | {("mx.count", FAIL)}
    assert report.exit_code == 1


async def test_backup_in_the_primarys_slash_24(pki: Pki) -> None:
    lab = Lab(pki, two_mx("samenet.test", "127.1.0.2"))
    lab.mx("mx1.samenet.test", "127.1.0.1", domains={"samenet.test"})
    lab.mx("mx2.samenet.test", "127.1.0.2", domains={"samenet.test"})
    with lab:
        report = await audit(lab, "samenet.test")
    # the lab's ASN file announces each /24 on its own: one prefix, one AS
    assert problems(report) == {
        ("site.backup", FAIL, "mx2.samenet.test"),
        ("site.prefix", FAIL, "mx2.samenet.test"),
        ("site.asn", WARN, "mx2.samenet.test"),
    }
    assert report.pairs() == HEALTHY - {("site.backup", OK), ("site.prefix", OK), ("site.asn", OK)} | {
        ("site.backup", FAIL),
        ("site.prefix", FAIL),
        ("site.asn", WARN),
    }
    mark = next(m for m in report.marks if m.check == "site.backup")
    assert "127.1.0.0/24" in mark.text and "mx1.samenet.test" in mark.text
    assert report.exit_code == 1


async def test_backup_in_the_primarys_slash_16_is_a_warning(pki: Pki) -> None:
    lab = Lab(pki, two_mx("nearby.test", "127.1.7.2"))
    lab.mx("mx1.nearby.test", "127.1.0.1", domains={"nearby.test"})
    lab.mx("mx2.nearby.test", "127.1.7.2", domains={"nearby.test"})
    with lab:
        report = await audit(lab, "nearby.test")
    assert problems(report) == {("site.backup", WARN, "mx2.nearby.test"), ("site.asn", WARN, "mx2.nearby.test")}
    assert "127.1.0.0/16" in next(m.text for m in report.marks if m.check == "site.backup")
    assert report.exit_code == 0 and report.strict_exit_code == 1


async def test_all_mx_names_on_one_address(pki: Pki) -> None:
    lab = Lab(pki, two_mx("sameaddr.test", "127.1.0.1"))
    lab.mx("mx1.sameaddr.test", "127.1.0.1", domains={"sameaddr.test"})
    with lab:
        report = await audit(lab, "sameaddr.test")
    # one server answers for both names with mx1's certificate: the mx2 probe sees a name mismatch
    assert problems(report) == {
        ("mx.distinct", FAIL, "sameaddr.test"),
        ("site.backup", FAIL, "mx2.sameaddr.test"),
        ("site.prefix", FAIL, "mx2.sameaddr.test"),
        ("site.asn", WARN, "mx2.sameaddr.test"),
        ("smtp.tls-cert", WARN, subject("mx2.sameaddr.test", "127.1.0.1")),
    }
    mismatch = next(m for m in report.marks if m.check == "smtp.tls-cert" and m.level is WARN)
    assert "mismatch" in mismatch.text.lower()


async def test_nameservers_inside_the_primarys_network(pki: Pki) -> None:
    """The Daum/Kakao shape: DNS lives in the primary's building, so the backup cannot even be found."""
    ns = ["ns1.nsinside.test.", "ns2.nsinside.test."]
    zones = two_mx("nsinside.test", ns=ns, ns1={"A": "127.1.0.53"}, ns2={"A": "127.1.0.54"})
    lab = Lab(pki, zones)
    lab.mx("mx1.nsinside.test", "127.1.0.1", domains={"nsinside.test"})
    lab.mx("mx2.nsinside.test", "127.2.0.1", domains={"nsinside.test"})
    with lab:
        report = await audit(lab, "nsinside.test")
    assert problems(report) == {("site.ns", WARN, "nsinside.test"), ("site.mx-zone", WARN, "nsinside.test")}
    assert report.pairs() == HEALTHY - {("site.ns", OK), ("site.mx-zone", OK)} | {
        ("site.ns", WARN),
        ("site.mx-zone", WARN),
    }
    assert report.exit_code == 0


async def test_nameservers_in_a_zone_served_from_the_primarys_network(pki: Pki) -> None:
    ns = ["ns1.hosted-dns.test.", "ns2.hosted-dns.test."]
    zones = {
        **two_mx("nsserved.test", ns=ns),
        # the nameservers themselves are elsewhere, but their names live in a zone that the primary's
        # site serves: when it burns, nobody can resolve ns1/ns2.hosted-dns.test
        "hosted-dns.test": zone([], {"ns1": "127.5.0.53", "ns2": "127.6.0.53"}, ns=["ns.primary-site.test."]),
        "primary-site.test": zone([], {"ns": "127.1.0.53"}, ns=["ns.primary-site.test."]),
    }
    lab = Lab(pki, zones)
    lab.mx("mx1.nsserved.test", "127.1.0.1", domains={"nsserved.test"})
    lab.mx("mx2.nsserved.test", "127.2.0.1", domains={"nsserved.test"})
    with lab:
        report = await audit(lab, "nsserved.test")
    assert problems(report) == {("site.ns", WARN, "nsserved.test")}
    assert "hosted-dns.test" in next(m.text for m in report.marks if m.check == "site.ns")


async def test_backup_accepting_unknown_users(pki: Pki) -> None:
    lab = Lab(pki, two_mx("catchall.test"))
    lab.mx("mx1.catchall.test", "127.1.0.1", domains={"catchall.test"})
    lab.mx("mx2.catchall.test", "127.2.0.1", domains={"catchall.test"}, users=None)
    with lab:
        report = await audit(lab, "catchall.test")
    assert problems(report) == {("smtp.unknown-user", WARN, subject("mx2.catchall.test", "127.2.0.1"))}
    assert "backscatter" in next(m.text for m in report.marks if m.level is WARN)
    assert report.exit_code == 0


async def test_primary_accepting_unknown_users_is_only_information(pki: Pki) -> None:
    lab = Lab(pki, two_mx("catchall1.test"))
    lab.mx("mx1.catchall1.test", "127.1.0.1", domains={"catchall1.test"}, users=None)
    lab.mx("mx2.catchall1.test", "127.2.0.1", domains={"catchall1.test"})
    with lab:
        report = await audit(lab, "catchall1.test")
    assert problems(report) == {("smtp.unknown-user", INFO, subject("mx1.catchall1.test", "127.1.0.1"))}


async def test_backup_that_is_an_open_relay(pki: Pki) -> None:
    lab = Lab(pki, two_mx("openrelay.test"))
    lab.mx("mx1.openrelay.test", "127.1.0.1", domains={"openrelay.test"})
    relay = lab.mx("mx2.openrelay.test", "127.2.0.1", domains={"openrelay.test"}, open_relay=True)
    with lab:
        report = await audit(lab, "openrelay.test")
    assert problems(report) == {("smtp.relay", FAIL, subject("mx2.openrelay.test", "127.2.0.1"))}
    assert report.pairs() == HEALTHY | {("smtp.relay", FAIL)}
    assert report.exit_code == 1
    assert "DATA" not in [cmd for _, cmd in relay.events]  # it would have relayed: we never gave it a message


async def test_backup_without_starttls(pki: Pki) -> None:
    lab = Lab(pki, two_mx("notls.test"))
    lab.mx("mx1.notls.test", "127.1.0.1", domains={"notls.test"})
    lab.mx("mx2.notls.test", "127.2.0.1", domains={"notls.test"}, tls=None)
    with lab:
        report = await audit(lab, "notls.test")
    assert problems(report) == {("smtp.starttls", FAIL, subject("mx2.notls.test", "127.2.0.1"))}
    backup = next(p for p in report.smtp if p.host == "mx2.notls.test")
    assert not backup.starttls_offered and backup.tls is None
    assert [t.reply.code if t.reply else None for t in backup.rcpts] == [250, 550, 554]  # tests ran in clear text
    assert report.exit_code == 1


async def test_self_signed_certificate_is_a_warning_with_details(pki: Pki) -> None:
    lab = Lab(pki, two_mx("selfsigned.test"))
    lab.mx("mx1.selfsigned.test", "127.1.0.1", domains={"selfsigned.test"})
    lab.mx("mx2.selfsigned.test", "127.2.0.1", domains={"selfsigned.test"}, tls="self-signed")
    with lab:
        report = await audit(lab, "selfsigned.test")
    assert problems(report) == {("smtp.tls-cert", WARN, subject("mx2.selfsigned.test", "127.2.0.1"))}
    backup = next(p for p in report.smtp if p.host == "mx2.selfsigned.test")
    assert backup.tls is not None and not backup.tls.verified and backup.tls.cert is not None
    assert backup.tls.cert.self_signed and backup.tls.cert.issuer == backup.tls.cert.subject == "CN=mx2.selfsigned.test"
    assert backup.tls.verify_error == "self-signed certificate"
    assert backup.rcpts and backup.rcpts[0].reply is not None  # the second session went on to the RCPT tests
    assert report.exit_code == 0 and report.strict_exit_code == 1


async def test_unreachable_backup(pki: Pki) -> None:
    lab = Lab(pki, two_mx("down.test", "127.2.0.9"))
    lab.mx("mx1.down.test", "127.1.0.1", domains={"down.test"})
    with lab:
        report = await audit(lab, "down.test")
    assert problems(report) == {("smtp.connect", FAIL, subject("mx2.down.test", "127.2.0.9"))}
    assert "refused" in next(m.text for m in report.marks if m.level is FAIL).lower()


async def test_mx_host_without_address_and_mx_alias(pki: Pki) -> None:
    zones = {
        "names.test": zone(
            ["10 mx1", "20 mx2", "30 mx3"], {"mx1": "127.1.0.1", "real3": "127.2.0.1"}, mx3={"CNAME": "real3"}
        )
    }
    lab = Lab(pki, zones)
    lab.mx("mx1.names.test", "127.1.0.1", domains={"names.test"})
    lab.mx("mx3.names.test", "127.2.0.1", domains={"names.test"})
    with lab:
        report = await audit(lab, "names.test")
    assert problems(report) == {("mx.address", FAIL, "mx2.names.test"), ("mx.address", WARN, "mx3.names.test")}
    assert "NXDOMAIN" in next(m.text for m in report.marks if m.level is FAIL)


async def test_no_mx_record(pki: Pki) -> None:
    lab = Lab(pki, {"nomx.test": zone([], {"@": "127.1.0.1"})})
    with lab:
        report = await audit(lab, "nomx.test")
    assert report.pairs() == {("mx.records", FAIL)}
    assert "no MX record" in report.marks[0].text
    assert report.smtp == ()


async def test_null_mx(pki: Pki) -> None:
    lab = Lab(pki, {"nullmx.test": zone(["0 ."], {})})
    with lab:
        report = await audit(lab, "nullmx.test")
    assert report.pairs() == {("mx.records", FAIL)}
    assert report.dns.null_mx


async def test_domain_that_does_not_exist(pki: Pki) -> None:
    lab = Lab(pki, two_mx("exists.test"))
    with lab:
        report = await audit(lab, "nope.exists.test")
    assert report.pairs() == {("mx.records", FAIL)}
    assert "NXDOMAIN" in report.marks[0].text


async def test_dns_timeout_is_a_failure_within_the_timeout(pki: Pki) -> None:
    lab = Lab(pki, two_mx("slow.test"))
    with lab:
        lab.dns.drop("slow.test", "MX")
        t0 = time.monotonic()
        report = await audit(lab, "slow.test", timeout=1.0)
        elapsed = time.monotonic() - t0
    assert report.pairs() == {("mx.records", FAIL)}
    assert "timeout" in report.marks[0].text
    assert elapsed < 5


async def test_ipv6_addresses_are_listed_and_probed(pki: Pki) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    lab = Lab(pki, two_mx("v6.test", mx2={"A": "127.2.0.1", "AAAA": "::1"}))
    lab.mx("mx1.v6.test", "127.1.0.1", domains={"v6.test"})
    lab.mx("mx2.v6.test", "127.2.0.1", domains={"v6.test"})
    lab.mx("mx2.v6.test", "::1", domains={"v6.test"})
    with lab:
        report = await audit(lab, "v6.test")
    assert report.pairs() == HEALTHY
    backup = next(r for r in report.dns.mx if r.host.name == "mx2.v6.test")
    assert backup.host.ips == ("127.2.0.1", "::1")
    assert sorted((p.host, p.address) for p in report.smtp) == [
        ("mx1.v6.test", "127.1.0.1"),
        ("mx2.v6.test", "127.2.0.1"),
        ("mx2.v6.test", "::1"),
    ]
    assert "[ ok ] smtp.relay" in render_text(report) and "mx2.v6.test [::1]" in render_text(report)


async def test_equal_preferences_judge_each_host_against_the_others(pki: Pki) -> None:
    zones = {"peers.test": zone(["10 mx1", "10 mx2"], {"mx1": "127.1.0.1", "mx2": "127.1.0.2"})}
    lab = Lab(pki, zones)
    lab.mx("mx1.peers.test", "127.1.0.1", domains={"peers.test"})
    lab.mx("mx2.peers.test", "127.1.0.2", domains={"peers.test"})
    with lab:
        report = await audit(lab, "peers.test")
    assert problems(report) == {
        (check, level, host)
        for host in ("mx1.peers.test", "mx2.peers.test")
        for check, level in (("site.backup", FAIL), ("site.prefix", FAIL), ("site.asn", WARN))
    }
    assert all(r.role.value == "primary" for r in report.dns.mx)


# --- this node's view (--config) --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("hostname", "domains", "expected"),
    [
        ("mx2.node.test", ["node.test"], {("node.domain", OK), ("node.mx", OK)}),
        ("elsewhere.lab.test", ["node.test"], {("node.domain", OK), ("node.mx", FAIL)}),
        ("mx2.node.test", ["other.test"], {("node.domain", FAIL), ("node.mx", OK)}),
        ("mx1.node.test", ["node.test"], {("node.domain", OK), ("node.mx", FAIL)}),  # we would be the primary
    ],
)
async def test_this_nodes_view(pki: Pki, hostname: str, domains: list[str], expected: set[Any]) -> None:
    lab = Lab(pki, two_mx("node.test"))
    lab.mx("mx1.node.test", "127.1.0.1", domains={"node.test"})
    lab.mx("mx2.node.test", "127.2.0.1", domains={"node.test"})
    with lab:
        report = await audit(lab, "node.test", config=node_config(hostname, domains))
    assert {p for p in report.pairs() if p[0].startswith("node.")} == expected
    assert report.pairs() - expected == HEALTHY
    assert report.node == hostname


async def test_config_nameservers_are_used_without_nameserver(pki: Pki) -> None:
    lab = Lab(pki, two_mx("viacfg.test"))
    lab.mx("mx1.viacfg.test", "127.1.0.1", domains={"viacfg.test"})
    lab.mx("mx2.viacfg.test", "127.2.0.1", domains={"viacfg.test"})
    with lab:
        cfg = node_config("mx2.viacfg.test", ["viacfg.test"], lab)
        report = await run_check("viacfg.test", config=cfg, smtp_port=lab.port, timeout=3, cafile=str(pki.ca))
    assert report.dns.resolver == lab.dns.nameserver
    # no --asn-db here: the network check says so
    assert report.pairs() == HEALTHY - {("site.asn", OK), ("site.prefix", OK)} | {
        ("site.asn", INFO),
        ("node.domain", OK),
        ("node.mx", OK),
    }
    assert "not checked" in next(m.text for m in report.marks if m.check == "site.asn")
    assert lab.dns.queried("viacfg.test", "MX") >= 1


WORST_PROBLEMS = {
    ("site.backup", FAIL, "mx2.worst.test"),
    ("site.prefix", FAIL, "mx2.worst.test"),
    ("site.asn", WARN, "mx2.worst.test"),
    ("sts.policy", WARN, "worst.test"),
    ("sts.mx-match", FAIL, "mx2.worst.test"),
    ("sts.cert", FAIL, "mx2.worst.test [127.1.0.2]"),
    ("dane.tlsa", FAIL, "mx2.worst.test"),
    ("tlsrpt.record", INFO, "worst.test"),
    ("site.ns", WARN, "worst.test"),
    ("site.mx-zone", WARN, "worst.test"),
    ("smtp.starttls", FAIL, "mx2.worst.test [127.1.0.2]"),
    ("smtp.unknown-user", WARN, "mx2.worst.test [127.1.0.2]"),
    ("smtp.relay", FAIL, "mx2.worst.test [127.1.0.2]"),
    ("node.domain", FAIL, "worst.test"),
    ("node.mx", FAIL, "backup.elsewhere.test"),
}


async def test_worst_case(pki: Pki) -> None:
    lab = worst_lab(pki)
    with lab:
        report = await audit(lab, "worst.test", config=node_config("backup.elsewhere.test", ["example.test"]))
    capture("worst", report)
    assert problems(report) == WORST_PROBLEMS
    assert report.exit_code == 1


def test_known_users_include_postmaster() -> None:
    assert "postmaster" in KNOWN_USERS
