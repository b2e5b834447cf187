"""The DMARC evaluator (policy/dmarc.py): records, the organizational domain, alignment, result words."""

from __future__ import annotations

import pytest

from backupmx.policy.dmarc import PSL, TempDnsError, evaluate, organizational_domain, parse_record

RECORDS = {
    "_dmarc.example.test": ["v=DMARC1; p=reject; aspf=s"],
    "_dmarc.org.test": ["v=DMARC1; p=none; sp=reject"],
    "_dmarc.two.test": ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
}


def txt(name: str) -> list[str] | None:
    if name == "_dmarc.down.test":
        raise TempDnsError("Timeout")
    return RECORDS.get(name)


@pytest.mark.skipif(not PSL.exists(), reason="needs Debian's publicsuffix package")
def test_organizational_domain_uses_the_public_suffix_list() -> None:
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("a.b.example.com") == "example.com"


def test_parse_record() -> None:
    assert parse_record("v=DMARC1; p=quarantine; pct=50") == {"v": "DMARC1", "p": "quarantine", "pct": "50"}
    assert parse_record("v=DMARC1; p=maybe") is None and parse_record("v=spf1 -all") is None


@pytest.mark.parametrize(
    ("from_domain", "spf", "spf_domain", "dkim", "expected"),
    [
        ("example.test", "pass", "example.test", [], ("pass", "reject")),
        ("example.test", "pass", "bounce.example.test", [], ("fail", "reject")),  # aspf=s: not aligned
        ("example.test", "fail", "example.test", ["mail.example.test"], ("pass", "reject")),  # adkim relaxed
        ("example.test", "fail", "example.test", ["other.test"], ("fail", "reject")),
        ("sub.org.test", "fail", "x.test", [], ("fail", "reject")),  # sp= of the organizational domain
        ("two.test", "fail", "x.test", [], ("none", "")),  # two records: no policy
        ("none.test", "pass", "none.test", [], ("none", "")),
        ("down.test", "pass", "down.test", [], ("temperror", "")),
        ("", "pass", "x.test", [], ("permerror", "")),
    ],
)
def test_evaluate(from_domain: str, spf: str, spf_domain: str, dkim: list[str], expected: tuple[str, str]) -> None:
    r = evaluate(from_domain, spf_result=spf, spf_domain=spf_domain, dkim_passes=dkim, txt=txt)
    assert (r.result, r.policy) == expected
