"""`check` against the lab, part II: would senders that follow MTA-STS, DANE or TLS-RPT use the backup,
and is it announced from the primary's network? One case per risk, each asserting its exact (check,
level) pairs and the subjects of every mark that is not ok (see test_check_lab.py for the lab's shape).

Each case has its own domain; the MTA-STS policy comes over HTTPS from a lab server on 127.7.x.y:443,
TLSA records are served with AD=1 from "signed" zones, and origin AS/prefix come from small ASN files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backupmx.audit.report import CheckReport, Level
from tests.unit.audit.lab import Lab, Pki, PolicyReply, problems, sts_policy, two_mx, zone
from tests.unit.audit.test_check_lab import HEALTHY, audit, capture, subject

OK, INFO, WARN, FAIL = Level.OK, Level.INFO, Level.WARN, Level.FAIL
STS_OK = {("sts.policy", OK), ("sts.mx-match", OK), ("sts.cert", OK)}
DANE_OK = {("dane.tlsa", OK), ("dane.match", OK)}


@dataclass
class Case:
    """One domain "<name>.test" with mx1 (127.1.0.1, primary) and mx2 (the backup, 127.2.0.1)."""

    name: str
    policy: str | PolicyReply | None = None  # MTA-STS policy served (None with sts=True: TXT only)
    sts: bool = False
    backup_cert: str | None = None  # the name on the backup's certificate (default: its own)
    backup_tls: str = "ca"  # "chain": it presents the lab CA too (for DANE-TA)
    tlsa: dict[str, str] = field(default_factory=dict)  # MX label -> TLSA rdata; the zone is then "signed"
    signed: bool = True
    tlsrpt: str | None = "v=TLSRPTv1; rua=mailto:tlsrpt@reports.lab.test"
    backup_label: str = "mx2"  # its name inside the zone
    asn_lines: list[str] | None = None  # an ASN file for this case (default: the lab's)
    asn_lookup: dict[str, str] | None = None  # --asn-lookup dns, with these origin.asn.cymru.com TXT records
    pairs: set[tuple[str, Level]] = field(default_factory=set)  # expected (check, level) pairs
    problems: set[tuple[str, Level, str]] = field(default_factory=set)  # expected marks that are not ok
    says: str = ""  # a phrase the first of those marks' texts must hold: the reason, not only the level

    @property
    def domain(self) -> str:
        return f"{self.name}.test"

    def host(self, label: str) -> str:
        return f"{label}.{self.domain}"


def build(pki: Pki, case: Case, tmp_path: Path) -> Lab:
    d = case.domain
    extra: dict[str, Any] = {f"_25._tcp.{label}": {"TLSA": rdata} for label, rdata in case.tlsa.items()}
    spec = zone(
        ["10 mx1", f"20 {case.backup_label}"],
        {"mx1": "127.1.0.1", case.backup_label: "127.2.0.1"},
        tlsrpt=case.tlsrpt,
        **extra,
    )
    zones: dict[str, Any] = {d: spec}
    if case.asn_lookup is not None:
        zones["origin.asn.cymru.com"] = {
            "@": {"NS": ["ns1.dns-one.test."]},
            **{k: {"TXT": f'"{v}"'} for k, v in case.asn_lookup.items()},
        }
    lab = Lab(pki, zones)
    lab.mx(case.host("mx1"), "127.1.0.1", domains={d})
    lab.mx(case.host(case.backup_label), "127.2.0.1", domains={d}, cert_name=case.backup_cert, tls=case.backup_tls)
    if case.tlsa and case.signed:
        lab.dns.secure(d)
    if case.sts:
        lab.sts(d, case.policy)
    if case.asn_lines is not None:
        lab.asn_db = tmp_path / "asn.dat"
        lab.asn_db.write_text("\n".join(case.asn_lines) + "\n")
    if case.asn_lookup is not None:
        lab.asn_db = None
    return lab


async def run(pki: Pki, case: Case, tmp_path: Path) -> CheckReport:
    with build(pki, case, tmp_path) as lab:
        return await audit(lab, case.domain, **({"asn_lookup": "dns"} if case.asn_lookup is not None else {}))


def mx2(name: str, label: str = "mx2") -> str:
    return subject(f"{label}.{name}.test", "127.2.0.1")


def tlsa_both(pki: Pki, name: str) -> dict[str, str]:
    return {"mx1": pki.tlsa(f"mx1.{name}.test"), "mx2": pki.tlsa(f"mx2.{name}.test")}


def cases(pki: Pki) -> list[Case]:
    """Made per test: the TLSA rdata needs the session's certificates."""
    return [
        Case("stsok", sts_policy("enforce", "mx1.stsok.test", "mx2.stsok.test"), sts=True, pairs=HEALTHY | STS_OK),
        Case(
            "stsmissing",
            sts_policy("enforce", "mx1.stsmissing.test"),
            sts=True,
            pairs=HEALTHY | STS_OK | {("sts.mx-match", FAIL)},
            says="not covered by the policy",
            problems={("sts.mx-match", FAIL, "mx2.stsmissing.test")},
        ),
        Case(
            "stsdeep",
            sts_policy("enforce", "*.stsdeep.test"),
            sts=True,
            backup_label="mx2.b",
            pairs=HEALTHY | STS_OK | {("sts.mx-match", FAIL)},
            says="matches one label only",
            problems={("sts.mx-match", FAIL, "mx2.b.stsdeep.test")},
        ),
        Case(
            "stsliteral",
            sts_policy("enforce", "mx1.stsliteral.test", "127.2.0.1"),
            sts=True,
            pairs=HEALTHY | STS_OK | {("sts.mx-match", FAIL)},
            says="IP literals",
            problems={("sts.mx-match", FAIL, "stsliteral.test"), ("sts.mx-match", FAIL, "mx2.stsliteral.test")},
        ),
        Case(
            "stscert",
            sts_policy("enforce", "*.stscert.test"),
            sts=True,
            backup_cert="mx.elsewhere.test",
            pairs=HEALTHY | STS_OK | {("sts.cert", FAIL), ("smtp.tls-cert", WARN)},
            says="enforcing senders will not deliver here",
            problems={("sts.cert", FAIL, mx2("stscert")), ("smtp.tls-cert", WARN, mx2("stscert"))},
        ),
        Case(
            "ststesting",
            sts_policy("testing", "mx1.ststesting.test", max_age=3600),
            sts=True,
            backup_cert="mx.elsewhere.test",
            pairs=HEALTHY
            | STS_OK
            | {("sts.policy", WARN), ("sts.mx-match", WARN), ("sts.cert", WARN), ("smtp.tls-cert", WARN)},
            says="mode testing",
            problems={
                ("sts.policy", WARN, "ststesting.test"),
                ("sts.mx-match", WARN, "mx2.ststesting.test"),
                ("sts.cert", WARN, mx2("ststesting")),
                ("smtp.tls-cert", WARN, mx2("ststesting")),
            },
        ),
        Case(
            "stsdown",
            None,
            sts=True,
            pairs=HEALTHY - {("sts.policy", OK)} | {("sts.policy", FAIL)},
            says="cannot connect",
            problems={("sts.policy", FAIL, "stsdown.test")},
        ),
        Case(
            "stsredirect",
            PolicyReply(301, location="https://elsewhere.test/policy"),
            sts=True,
            pairs=HEALTHY - {("sts.policy", OK)} | {("sts.policy", FAIL)},
            says="forbids following redirects",
            problems={("sts.policy", FAIL, "stsredirect.test")},
        ),
        Case(
            "stshtml",
            PolicyReply(200, "text/html", sts_policy("enforce", "*.stshtml.test")),
            sts=True,
            pairs=HEALTHY - {("sts.policy", OK)} | {("sts.policy", FAIL)},
            says="'text/html'",
            problems={("sts.policy", FAIL, "stshtml.test")},
        ),
        Case(
            "stswrongcert",
            PolicyReply(body=sts_policy("enforce", "*.stswrongcert.test"), cert_name="www.elsewhere.test"),
            sts=True,
            pairs=HEALTHY - {("sts.policy", OK)} | {("sts.policy", FAIL)},
            says="certificate not verified",
            problems={("sts.policy", FAIL, "stswrongcert.test")},
        ),
        Case(
            "stsbig",
            "version: STSv1\r\n" + "x: y\r\n" * 11000,
            sts=True,
            pairs=HEALTHY - {("sts.policy", OK)} | {("sts.policy", FAIL)},
            says="larger than 64 KiB",
            problems={("sts.policy", FAIL, "stsbig.test")},
        ),
        Case(
            "daneprimary",
            tlsa={"mx1": pki.tlsa("mx1.daneprimary.test")},
            pairs=HEALTHY | DANE_OK | {("dane.tlsa", FAIL)},
            says="DANE senders will not use the backup",
            problems={("dane.tlsa", FAIL, "mx2.daneprimary.test")},
        ),
        Case(
            "danemismatch",
            tlsa={"mx1": pki.tlsa("mx1.danemismatch.test"), "mx2": "3 1 1 " + "ab" * 32},
            pairs=HEALTHY | DANE_OK | {("dane.match", FAIL)},
            says="match none of the TLSA records",
            problems={("dane.match", FAIL, mx2("danemismatch"))},
        ),
        Case(
            "daneunusable",
            tlsa={"mx1": pki.tlsa("mx1.daneunusable.test"), "mx2": pki.tlsa("mx2.daneunusable.test", usage=1)},
            pairs=HEALTHY | DANE_OK | {("dane.match", FAIL)},
            says="no usable TLSA record",
            problems={("dane.match", FAIL, mx2("daneunusable"))},
        ),
        Case(
            "daneunsigned",
            tlsa=tlsa_both(pki, "daneunsigned"),
            signed=False,
            pairs=HEALTHY - {("dane.tlsa", OK)} | {("dane.tlsa", WARN), ("dane.match", OK)},
            says="not DNSSEC-validated",
            problems={("dane.tlsa", WARN, "mx1.daneunsigned.test"), ("dane.tlsa", WARN, "mx2.daneunsigned.test")},
        ),
        Case(
            "rptmissing",
            tlsrpt=None,
            pairs=HEALTHY - {("tlsrpt.record", OK)} | {("tlsrpt.record", INFO)},
            says='TXT "v=TLSRPTv1; rua=mailto:tlsrpt@rptmissing.test"',
            problems={("tlsrpt.record", INFO, "rptmissing.test")},
        ),
        Case(
            "rptmalformed",
            tlsrpt="v=TLSRPTv1; rua=http://reports.lab.test/",
            pairs=HEALTHY - {("tlsrpt.record", OK)} | {("tlsrpt.record", WARN)},
            says="neither mailto",
            problems={("tlsrpt.record", WARN, "rptmalformed.test")},
        ),
        Case(
            "rptnorua",
            tlsrpt="v=TLSRPTv1 rua=mailto:tls@rptnorua.test",
            pairs=HEALTHY - {("tlsrpt.record", OK)} | {("tlsrpt.record", WARN)},
            says="does not start with v=TLSRPTv1",
            problems={("tlsrpt.record", WARN, "rptnorua.test")},
        ),
        Case(
            "oneas",
            asn_lines=["; both MX hosts with one provider", "127.1.0.0/24\t64500", "127.2.0.0/24\t64500"],
            pairs=HEALTHY - {("site.asn", OK)} | {("site.asn", WARN)},
            says="same provider",
            problems={("site.asn", WARN, "mx2.oneas.test")},
        ),
        Case(
            "oneprefix",
            asn_lines=["127.0.0.0/8\t64500"],
            pairs=HEALTHY - {("site.asn", OK), ("site.prefix", OK)} | {("site.asn", WARN), ("site.prefix", FAIL)},
            says="same prefix",
            problems={("site.asn", WARN, "mx2.oneprefix.test"), ("site.prefix", FAIL, "mx2.oneprefix.test")},
        ),
        Case(
            "cymru",
            asn_lookup={
                "1.0.1.127": "64500 | 127.1.0.0/24 | ZZ | lab | 2026-01-01",
                "1.0.2.127": "64500 64510 | 127.2.0.0/24 | ZZ | lab | 2026-01-01",
            },
            pairs=HEALTHY - {("site.asn", OK)} | {("site.asn", WARN)},
            says="same provider",
            problems={("site.asn", WARN, "mx2.cymru.test")},
        ),
        Case(
            "asnunknown",
            asn_lines=["127.1.0.0/24\t64501"],
            pairs=HEALTHY - {("site.asn", OK), ("site.prefix", OK)} | {("site.asn", INFO)},
            says="not in the ASN file",
            problems={("site.asn", INFO, "mx2.asnunknown.test")},
        ),
    ]


CASE_NAMES = [
    "stsok",
    "stsmissing",
    "stsdeep",
    "stsliteral",
    "stscert",
    "ststesting",
    "stsdown",
    "stsredirect",
    "stshtml",
    "stswrongcert",
    "stsbig",
    "daneprimary",
    "danemismatch",
    "daneunusable",
    "daneunsigned",
    "rptmissing",
    "rptmalformed",
    "rptnorua",
    "oneas",
    "oneprefix",
    "cymru",
    "asnunknown",
]


@pytest.mark.parametrize("name", CASE_NAMES)
async def test_case(pki: Pki, tmp_path: Path, name: str) -> None:
    case = next(c for c in cases(pki) if c.name == name)
    report = await run(pki, case, tmp_path)
    assert problems(report) == case.problems
    assert report.pairs() == case.pairs
    texts = [m.text for m in report.marks if m.level is not OK]
    assert not case.problems or any(case.says in t for t in texts), texts


async def test_healthy_domain_with_every_policy_in_place(pki: Pki, tmp_path: Path) -> None:
    """MTA-STS enforce covering both, DANE-EE on the primary and DANE-TA on the backup (which presents
    its chain), TLS-RPT, and the MX hosts in distinct prefixes and ASes: no finding at all."""
    case = Case(
        "allgood",
        sts_policy("enforce", "mx1.allgood.test", "*.allgood.test"),
        sts=True,
        backup_tls="chain",
        tlsa={"mx1": pki.tlsa("mx1.allgood.test"), "mx2": pki.tlsa(None, usage=2, selector=0, mtype=2)},
    )
    with build(pki, case, tmp_path) as lab:
        report = await audit(lab, case.domain)
    capture("healthy-policies", report)
    assert problems(report) == set()
    assert report.pairs() == HEALTHY | STS_OK | DANE_OK
    assert report.exit_code == 0 and report.strict_exit_code == 0
    assert report.sts is not None and report.sts.policy is not None and report.sts.policy.mode == "enforce"
    backup = next(p for p in report.smtp if p.host == "mx2.allgood.test")
    assert backup.tls is not None and len(backup.tls.chain) == 2
    assert {m.text for m in report.marks if m.check == "dane.match"} == {
        "matches TLSA 3 1 1 (DANE-EE)",
        "matches TLSA 2 0 2 (DANE-TA)",
    }


async def test_without_asn_source_the_network_is_not_checked(pki: Pki) -> None:
    lab = Lab(pki, two_mx("noasn.test"))
    lab.asn_db = None
    lab.mx("mx1.noasn.test", "127.1.0.1", domains={"noasn.test"})
    lab.mx("mx2.noasn.test", "127.2.0.1", domains={"noasn.test"})
    with lab:
        report = await audit(lab, "noasn.test")
    assert problems(report) == {("site.asn", INFO, "noasn.test")}
    assert report.pairs() == HEALTHY - {("site.asn", OK), ("site.prefix", OK)} | {("site.asn", INFO)}
    assert "not checked" in next(m.text for m in report.marks if m.check == "site.asn")
    assert not any(q.qname.endswith("cymru.com") for q in lab.dns.queries)  # nothing learned the addresses
