"""The parsers and matchers under the policy checks, without a network: MTA-STS policy text and mx
patterns, TLS-RPT records, pyasn files and Team Cymru names, and DANE certificate associations."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from backupmx.audit.asn import AsnTable, cymru_name
from backupmx.audit.dane import Tlsa, TlsaSet, association, dane_marks, matches
from backupmx.audit.report import Address, Host, Level, MxRecord, Role, TlsInfo
from backupmx.audit.sts import StsPolicy, StsView, is_ip_literal, mx_matches, parse_policy, sts_marks
from backupmx.audit.tlsrpt import TlsRptView, parse_tlsrpt, tlsrpt_marks
from tests.unit.audit.test_rules import NOW, cert, probe

OK, INFO, WARN, FAIL = Level.OK, Level.INFO, Level.WARN, Level.FAIL


def test_policy_is_parsed_with_crlf_and_unknown_keys() -> None:
    p = parse_policy(
        "version: STSv1\r\nmode: enforce\r\nmx: MX1.example.com.\r\nmx: *.example.net\r\n"
        "max_age: 604800\r\nextension: ignored\r\n"
    )
    assert (p.mode, p.mx, p.max_age) == ("enforce", ("mx1.example.com", "*.example.net"), 604800)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mx == ()  # withdrawing needs no mx


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("mode: enforce\nmx: a\nmax_age: 1\n", "no version line"),
        ("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n", "not STSv1"),
        ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "not enforce, testing or none"),
        ("version: STSv1\nmode: enforce\nmx: a\nmax_age: 31557601\n", "up to 31557600"),
        ("version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n", "max_age"),
        ("version: STSv1\nmode: testing\nmax_age: 86400\n", "no mx line"),
        ("<html>version: STSv1</html>\nno colon here\n", 'not "key: value"'),
    ],
)
def test_bad_policies_say_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_policy(text)


@pytest.mark.parametrize(
    ("host", "pattern", "matched"),
    [
        ("mx1.example.com", "mx1.example.com", True),
        ("MX1.Example.com.", "mx1.example.com", True),
        ("mx1.example.com", "*.example.com", True),
        ("a.b.example.com", "*.example.com", False),  # one label only (RFC 8461 §4.1)
        ("example.com", "*.example.com", False),
        ("mx1.example.com", "mx2.example.com", False),
        ("mx1.example.com.evil.test", "*.example.com", False),
    ],
)
def test_mx_patterns(host: str, pattern: str, matched: bool) -> None:
    assert mx_matches(host, pattern) is matched


def test_ip_literals() -> None:
    assert is_ip_literal("192.0.2.1") and is_ip_literal("[2001:db8::1]") and not is_ip_literal("mx.example.com")


def test_tlsrpt_records() -> None:
    assert parse_tlsrpt("v=TLSRPTv1; rua=mailto:a@example.com,https://r.example.com/x") == (
        "mailto:a@example.com",
        "https://r.example.com/x",
    )
    for bad, why in (
        ("v=TLSRPTv1;", "no rua"),
        ("v=TLSRPTv2; rua=mailto:a@b", "v=TLSRPTv1"),
        ("v=TLSRPTv1; rua=ftp://x", "neither"),
        ("v=TLSRPTv1; rua", "not key=value"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_tlsrpt(bad)


def test_asn_file_longest_prefix_and_errors(tmp_path: Path) -> None:
    table = AsnTable(["; IP-ASN32-DAT", "", "192.0.2.0/24\t64500", "192.0.2.128/25\t64501", "2001:db8::/32\t64502"])
    assert (table.lookup("192.0.2.1").asn, table.lookup("192.0.2.1").prefix) == (64500, "192.0.2.0/24")
    assert (table.lookup("192.0.2.200").asn, table.lookup("192.0.2.200").prefix) == (64501, "192.0.2.128/25")
    assert table.lookup("2001:db8::25").prefix == "2001:db8::/32"
    assert table.lookup("198.51.100.1").asn is None
    # keeping only what covers the addresses asked about gives the same answers
    lines = ["192.0.2.0/24\t64500", "192.0.2.128/25\t64501", "198.51.100.0/24\t64503", "2001:db8::/32\t64502"]
    only = AsnTable(lines, only=["192.0.2.200", "2001:db8::25"])
    assert only.lookup("192.0.2.200").asn == 64501 and only.lookup("2001:db8::25").asn == 64502
    assert only.lookup("198.51.100.1").asn is None  # not asked for, not kept
    path = tmp_path / "asn.dat"
    path.write_text("\n".join(lines) + "\n")
    assert AsnTable.load(str(path), ["192.0.2.1"]).lookup("192.0.2.1").prefix == "192.0.2.0/24"
    with pytest.raises(ValueError, match=r"line 2: .*does not appear to be"):
        AsnTable(["192.0.2.0/24\t64500", "not-a-prefix\t1"], "f")
    with pytest.raises(ValueError, match="line 1: expected"):
        AsnTable(["192.0.2.0/24"], "f")
    with pytest.raises(ValueError, match=r"--asn-db .*missing\.dat"):
        AsnTable.load(str(tmp_path / "missing.dat"))


def test_cymru_names() -> None:
    assert cymru_name("192.0.2.1") == "1.2.0.192.origin.asn.cymru.com"
    assert cymru_name("2001:db8::1") == "1.0.0.0." + "0." * 20 + "8.b.d.0.1.0.0.2.origin6.asn.cymru.com"


def _cert(name: str, issuer_key: ec.EllipticCurvePrivateKey | None = None) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(issuer_key or key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER), key


def test_dane_associations() -> None:
    leaf, key = _cert("mx.example.com")
    ca, _ = _cert("ca")
    spki = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert association(leaf, 1, 1) == hashlib.sha256(spki).digest()
    assert association(leaf, 0, 2) == hashlib.sha512(leaf).digest()
    assert association(leaf, 0, 0) == leaf
    chain = (leaf, ca)
    for usage, selector, mtype, der, expected in [
        (3, 1, 1, leaf, True),
        (3, 0, 1, leaf, True),
        (3, 1, 2, leaf, True),
        (3, 0, 0, leaf, True),
        (3, 1, 1, ca, False),  # DANE-EE names the server's own certificate, not its issuer
        (2, 0, 1, ca, True),
        (2, 1, 1, ca, True),
        (2, 1, 1, leaf, False),  # DANE-TA names an issuer
    ]:
        record = Tlsa(usage, selector, mtype, association(der, selector, mtype))
        assert matches(record, chain) is expected, (usage, selector, mtype)
    assert not matches(Tlsa(2, 0, 1, association(ca, 0, 1)), (leaf,))  # the issuer was not presented
    assert not Tlsa(1, 1, 1, b"").usable and not Tlsa(0, 0, 1, b"").usable and Tlsa(2, 1, 1, b"").usable


# --- the rules, on views made by hand (paths the lab does not walk) -------------------------------------
MX = (MxRecord(10, Host("mx.example.test", (Address("192.0.2.1", 300),)), 300, Role.BACKUP),)


def sts_view(**kw: Any) -> StsView:
    base: dict[str, Any] = dict(
        domain="example.test",
        txt=("v=STSv1; id=1",),
        url="https://mta-sts.example.test/x",
        policy=StsPolicy("enforce", ("mx.example.test",), 604800),
    )
    base.update(kw)
    return StsView(**base)


@pytest.mark.parametrize(
    ("changes", "probe_changes", "expected"),
    [
        ({"txt": (), "txt_error": "DNS timeout", "policy": None}, {}, {("sts.policy", WARN)}),
        ({"txt": ("v=STSv1; id=1", "v=STSv1; id=2")}, {}, {("sts.policy", WARN)}),
        ({"txt": ("v=STSv1; id=not-valid!",)}, {}, {("sts.policy", WARN)}),
        ({"policy": StsPolicy("none", (), 0)}, {}, {("sts.policy", INFO)}),
        ({}, {"tls": TlsInfo("TLSv1.3", "X", cert(days_left=5), True)}, {("sts.cert", FAIL)}),  # expires soon
        (
            {"policy": StsPolicy("testing", ("mx.example.test",), 604800)},
            {"tls": TlsInfo("TLSv1.3", "X", cert(days_left=5), True)},
            {("sts.cert", WARN)},
        ),
        ({}, {"skipped": "no IPv6 route", "tls": None}, set()),  # not seen: nothing said about it
        ({}, {"error": "connect: refused", "tls": None}, set()),  # smtp.connect says it
    ],
)
def test_sts_rules(changes: dict[str, Any], probe_changes: dict[str, Any], expected: set[Any]) -> None:
    found = sts_marks(sts_view(**changes), MX, (probe(**probe_changes),), NOW)
    assert {(m.check, m.level) for m in found if m.level is not OK} == expected
    assert all(m.hint for m in found if m.level in (WARN, FAIL))


def test_dane_rules_without_tls_and_with_a_lookup_failure() -> None:
    record = Tlsa(3, 1, 1, b"x" * 32)
    sets = (TlsaSet("mx.example.test", (record,), True),)
    no_tls = probe(tls=None, starttls_offered=False)
    assert {(m.check, m.level) for m in dane_marks("example.test", MX, sets, (no_tls,))} == {
        ("dane.tlsa", OK),
        ("dane.match", FAIL),
    }
    failed = (TlsaSet("mx.example.test", (), False, "DNS timeout"),)
    assert {(m.check, m.level) for m in dane_marks("example.test", MX, failed, (probe(),))} == {("dane.tlsa", WARN)}


def test_tlsrpt_rules() -> None:
    assert [m.level for m in tlsrpt_marks(TlsRptView("example.test", ("v=TLSRPTv1; rua=mailto:a@b",) * 2))] == [WARN]
    assert [m.level for m in tlsrpt_marks(TlsRptView("example.test", (), "DNS timeout"))] == [WARN]
