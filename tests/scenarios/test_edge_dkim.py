"""DKIM and DMARC at the backup on a real `backupmx serve` ([policy] spf, dkim, dmarc), with keys and records on
the tests' own DNS server and messages signed by dkimpy: the stored copy starts with one
`Authentication-Results:` field joining spf=, dkim= and dmarc= for pass, fail, none and temperror; a
dmarc=fail under p=reject is refused (550 5.7.1) for a domain with dmarc_reject = true and stored, marked,
for one without."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scenarios.test_edge_client import EdgeClient
from tests.scenarios.test_edge_rspamd import header_of, stored
from tests.support.dnsserver import DnsServer
from tests.support.ports import free_port, wait_for_smtp
from tests.support.rsa_key import new_rsa_key
from tests.support.serve import ServeProcess

dkim = pytest.importorskip("dkim")
pytest.importorskip("spf")


def rsa_key(tmp: Path) -> tuple[bytes, str]:
    """A 1024-bit RSA key (PEM) and its public half for the DKIM record (p=, base64 of the DER)."""
    key = tmp / "dkim.pem"
    public = new_rsa_key(key, 1024)
    return key.read_bytes(), public


def zones(public: str) -> dict[str, object]:
    dkim_txt = f'"v=DKIM1; k=rsa; p={public}"'
    return {
        "good.test": {
            "@": {"TXT": '"v=spf1 ip4:127.0.0.2 -all"'},
            "sel._domainkey": {"TXT": dkim_txt},
            "_dmarc": {"TXT": '"v=DMARC1; p=reject"'},
        },
        "nodmarc.test": {"@": {"TXT": '"v=spf1 ip4:127.0.0.2 -all"'}, "sel._domainkey": {"TXT": dkim_txt}},
        "broken.test": {
            "@": {"TXT": '"v=spf1 ip4:127.0.0.2 -all"'},
            "sel._domainkey": {"TXT": dkim_txt},
            "_dmarc": {"TXT": '"v=DMARC1; p=reject"'},
        },
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, bytes]]:
    tmp = tmp_path_factory.mktemp("edge_dkim")
    private, public = rsa_key(tmp)
    with DnsServer(zones(public)) as dnsd:
        dnsd.fail("sel._domainkey.broken.test", rcode="SERVFAIL")
        dnsd.fail("_dmarc.broken.test", rcode="SERVFAIL")
        dead = free_port()
        node = ServeProcess(
            tmp / "node",
            domains=[
                {"name": "ours.test", "primary": [f"127.0.0.1:{dead}"], "recipients": ["alice"], "dmarc_reject": True},
                {"name": "lax.test", "primary": [f"127.0.0.1:{dead}"], "recipients": ["carol"]},
            ],
            extra={
                "policy": {"spf": True, "dkim": True, "dmarc": True},
                "dns": {"nameservers": [dnsd.nameserver], "timeout": "1s"},
            },
        )
        with node:
            node.start()
            yield node, private


def message(domain: str, key: bytes | None, *, tamper: bool = False) -> bytes:
    msg = (
        f"From: Sam <sam@{domain}>\r\nTo: alice@ours.test\r\nSubject: figures\r\n"
        f"Message-ID: <1@{domain}>\r\nDate: Sun, 06 Dec 2026 03:00:00 +0000\r\n\r\nThe figures.\r\n"
    ).encode()
    if key is not None:
        sig = dkim.sign(msg, b"sel", domain.encode(), key, include_headers=[b"from", b"to", b"subject"])
        msg = sig + msg
    return msg.replace(b"The figures.", b"The figures!") if tamper else msg


def send(node: ServeProcess, body: bytes, *, source: str, sender: str, rcpt: str = "alice@ours.test") -> str:
    with EdgeClient(node.port, source=source) as c:
        assert c.cmd("EHLO client.test").startswith("250")
        return c.send_mail(body, sender=sender, rcpts=(rcpt,))[-1]


def results(node: ServeProcess, reply: str) -> str:
    fields = [f for f in header_of(stored(node, reply)) if f.startswith("Authentication-Results: backup.test;")]
    assert len(fields) == 1, fields
    assert header_of(stored(node, reply))[0] == fields[0]  # at the very top
    return fields[0]


@pytest.mark.parametrize(
    ("domain", "signed", "source", "expected"),
    [
        (
            "good.test",
            True,
            "127.0.0.3",  # SPF fails, but the aligned DKIM signature passes DMARC
            "spf=fail smtp.mailfrom=sam@good.test; dkim=pass header.d=good.test header.s=sel; "
            "dmarc=pass (p=reject) header.from=good.test",
        ),
        (
            "good.test",
            False,
            "127.0.0.2",  # no signature; SPF passes and is aligned
            "spf=pass smtp.mailfrom=sam@good.test; dkim=none; dmarc=pass (p=reject) header.from=good.test",
        ),
        (
            "nodmarc.test",
            True,
            "127.0.0.2",
            "spf=pass smtp.mailfrom=sam@nodmarc.test; dkim=pass header.d=nodmarc.test header.s=sel; "
            "dmarc=none header.from=nodmarc.test",
        ),
        (
            "broken.test",
            True,
            "127.0.0.2",
            "spf=pass smtp.mailfrom=sam@broken.test; dkim=temperror header.d=broken.test header.s=sel; "
            "dmarc=temperror header.from=broken.test",
        ),
    ],
)
def test_results(world: tuple[ServeProcess, bytes], domain: str, signed: bool, source: str, expected: str) -> None:
    node, key = world
    reply = send(node, message(domain, key if signed else None), source=source, sender=f"sam@{domain}")
    assert results(node, reply) == f"Authentication-Results: backup.test; {expected}"


def test_dmarc_reject(world: tuple[ServeProcess, bytes]) -> None:
    node, key = world
    forged = message("good.test", key, tamper=True)  # the body changed after signing: dkim=fail
    before = node.queue_count()
    reply = send(node, forged, source="127.0.0.3", sender="sam@good.test")
    assert reply == "550 5.7.1 Message rejected by the DMARC policy of its From domain"
    assert node.queue_count() == before
    reply = send(node, forged, source="127.0.0.3", sender="sam@good.test", rcpt="carol@lax.test")
    assert results(node, reply) == (
        "Authentication-Results: backup.test; spf=fail smtp.mailfrom=sam@good.test; "
        "dkim=fail header.d=good.test header.s=sel; dmarc=fail (p=reject) header.from=good.test"
    )


def test_spf_reject(tmp_path: Path) -> None:
    """spf_reject = true: SPF fail gets 550 5.7.1 at MAIL when every domain asks for it, else at RCPT for
    the domains that do; softfail, pass and a permitted client pass."""
    spf_zones = {
        "good.test": {"@": {"TXT": '"v=spf1 ip4:127.0.0.2 -all"'}},
        "soft.test": {"@": {"TXT": '"v=spf1 ip4:127.0.0.2 ~all"'}},
    }
    with DnsServer(spf_zones) as dnsd:
        dns = {"nameservers": [dnsd.nameserver], "timeout": "1s"}
        dead = free_port()
        strict = {"name": "ours.test", "primary": [f"127.0.0.1:{dead}"], "recipients": ["alice"], "spf_reject": True}
        everywhere = ServeProcess(tmp_path / "all", domains=[strict], extra={"dns": dns})
        lax = {"name": "lax.test", "primary": [f"127.0.0.1:{dead}"], "recipients": ["carol"]}
        mixed = ServeProcess(tmp_path / "mixed", domains=[strict, lax], extra={"dns": dns})
        with everywhere, mixed:
            everywhere.start(wait=False)
            mixed.start()
            wait_for_smtp(everywhere.host, everywhere.port)
            refused = "550 5.7.1 Message rejected: SPF check failed for the sender's domain"
            with EdgeClient(everywhere.port, source="127.0.0.3") as c:
                assert c.cmd("EHLO client.test").startswith("250")
                assert c.cmd("MAIL FROM:<sam@good.test>") == refused
                assert c.cmd("MAIL FROM:<sam@soft.test>").startswith("250")  # softfail is not fail
            with EdgeClient(everywhere.port, source="127.0.0.2") as c:
                assert c.cmd("EHLO client.test").startswith("250")
                assert c.cmd("MAIL FROM:<sam@good.test>").startswith("250")
            with EdgeClient(mixed.port, source="127.0.0.3") as c:
                assert c.cmd("EHLO client.test").startswith("250")
                assert c.cmd("MAIL FROM:<sam@good.test>").startswith("250")
                assert c.cmd("RCPT TO:<alice@ours.test>") == refused
                assert c.cmd("RCPT TO:<carol@lax.test>").startswith("250")


def test_arc_seal_verified_as_a_primary_would(tmp_path: Path) -> None:
    """With [policy] arc_key, the stored copy carries an ARC set (i=1, cv=none) over our results, and
    dkimpy's ARC verifier, reading the key from DNS as the primary would, finds the chain valid."""
    private, public = rsa_key(tmp_path)
    key_file = tmp_path / "arc.pem"
    key_file.write_bytes(private)
    records = zones(public)
    records["backup.test"] = {"arc._domainkey": {"TXT": f'"v=DKIM1; k=rsa; p={public}"'}}
    with DnsServer(records) as dnsd:
        node = ServeProcess(
            tmp_path / "node",
            domains=[{"name": "ours.test", "primary": [f"127.0.0.1:{free_port()}"], "recipients": ["alice"]}],
            extra={
                "policy": {
                    "spf": True,
                    "dkim": True,
                    "dmarc": True,
                    "arc_key": str(key_file),
                    "arc_selector": "arc",
                    "arc_domain": "backup.test",
                },
                "dns": {"nameservers": [dnsd.nameserver], "timeout": "1s"},
            },
        )
        with node:
            node.start()
            reply = send(node, message("good.test", private), source="127.0.0.2", sender="sam@good.test")
            sealed = stored(node, reply)

        def txt(name: bytes, timeout: float = 5) -> bytes | None:
            import dns.resolver

            r = dns.resolver.Resolver(configure=False)
            r.nameservers = [dnsd.host]
            r.port = dnsd.port
            return b"".join(r.resolve(name.decode(), "TXT")[0].strings)

        cv, _results, comment = dkim.arc_verify(sealed, dnsfunc=txt)
    assert cv == dkim.CV_Pass, comment
    fields = header_of(sealed)
    assert fields[0].startswith("ARC-Seal: i=1; cv=none;") or "cv=none" in fields[0]
    aar = next(f for f in fields if f.startswith("ARC-Authentication-Results: i=1; backup.test;"))
    assert "dkim=pass" in aar and "dmarc=pass" in aar and "arc=none" in aar
