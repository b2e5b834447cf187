"""The DER reader against certificates made by the openssl CLI, and against garbage."""

from __future__ import annotations

import ssl
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from backupmx.audit.x509 import parse_certificate
from tests.unit.audit.lab import Pki


def der(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def openssl_dates(pem: Path) -> tuple[datetime, datetime]:
    out = subprocess.run(
        ["openssl", "x509", "-in", str(pem), "-noout", "-startdate", "-enddate"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    values = dict(line.split("=", 1) for line in out.splitlines())
    fmt = "%b %d %H:%M:%S %Y GMT"
    return (
        datetime.strptime(" ".join(values["notBefore"].split()), fmt).replace(tzinfo=UTC),
        datetime.strptime(" ".join(values["notAfter"].split()), fmt).replace(tzinfo=UTC),
    )


def test_ca_signed_leaf(pki: Pki) -> None:
    cert_path, _ = pki.leaf("mx9.x509.test")
    info = parse_certificate(der(cert_path))
    assert info.subject == "CN=mx9.x509.test"
    assert info.issuer == "O=backupmx lab, CN=backupmx lab CA"
    assert not info.self_signed
    assert info.dns_names == ("mx9.x509.test",)
    assert (info.not_before, info.not_after) == openssl_dates(cert_path)


def test_self_signed(pki: Pki) -> None:
    cert_path, _ = pki.leaf("mx9.x509.test", "self-signed")
    info = parse_certificate(der(cert_path))
    assert info.self_signed and info.issuer == info.subject == "CN=mx9.x509.test"
    assert (info.not_before, info.not_after) == openssl_dates(cert_path)


def test_generalized_time_after_2049(tmp_path: Path) -> None:
    """RFC 5280: dates from 2050 on are GeneralizedTime, earlier ones UTCTime; both in one certificate."""
    pem = tmp_path / "far.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(tmp_path / "far.key"),
            "-out",
            str(pem),
            "-days",
            "20000",
            "-subj",
            "/C=KR/O=Far Future/CN=far.x509.test",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    info = parse_certificate(der(pem))
    assert info.not_after.year > 2049
    assert (info.not_before, info.not_after) == openssl_dates(pem)
    assert info.subject == "C=KR, O=Far Future, CN=far.x509.test"
    assert info.dns_names == ()


@pytest.mark.parametrize(
    "blob", [b"", b"\x30", b"\x30\x84\xff\xff\xff\xff", b"\x04\x03abc", b"\x30\x03\x02\x01\x00", bytes(range(256))]
)
def test_garbage_raises_value_error(blob: bytes) -> None:
    with pytest.raises(ValueError):
        parse_certificate(blob)


def test_truncated_certificate_raises(pki: Pki) -> None:
    data = der(pki.leaf("mx9.x509.test")[0])
    for cut in (10, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError):
            parse_certificate(data[:cut])
