"""The RCPT probe over real sockets against an aiosmtpd primary: known, unknown, greylisted, policy 5xx,
nothing listening, a black hole, the next target, STARTTLS (opportunistic and verified)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from backupmx.delivery.route import Target
from backupmx.policy.verify import ProbeAnswer, SmtpRcptProber
from tests.support.serve import free_port
from tests.unit.delivery.fake_primary import BlackHole, Primary, self_signed

REPO = Path(__file__).resolve().parents[3]


@dataclass
class FakeRoute:
    targets: Sequence[Target]


class Routes:
    def __init__(self, *targets: Target) -> None:
        self.targets = list(targets)

    async def resolve(self, domain: str) -> FakeRoute:
        return FakeRoute(self.targets)


def rule(address: str) -> str | None:
    local = address.split("@")[0]
    if local in ("alice", "bob"):
        return None
    if local == "grey":
        return "450 4.2.0 <grey@ours.test>: Recipient address rejected: Greylisted"
    if local == "policy":
        return "554 5.7.1 <policy@ours.test>: Relay access denied"
    return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown in virtual mailbox table"


@pytest.fixture
async def primary() -> AsyncIterator[Primary]:
    p = await Primary().start()
    p.rcpt_rule = rule
    yield p
    await p.stop()


def prober(*targets: Target, timeout: float = 3.0, tls_verify: bool = False) -> SmtpRcptProber:
    return SmtpRcptProber(
        Routes(*targets), local_hostname="backup.test", timeout=timeout, tls_verify=["ours.test"] if tls_verify else []
    )


def at(port: int) -> Target:
    return Target("127.0.0.1", port)


async def test_known_unknown_and_temporary(primary: Primary) -> None:
    p = prober(at(primary.port))
    known = await p.probe("ours.test", "alice@ours.test")
    assert known.answer is ProbeAnswer.KNOWN and known.answered
    unknown = await p.probe("ours.test", "nobody@ours.test")
    assert unknown.answer is ProbeAnswer.UNKNOWN and unknown.detail.startswith("550 5.1.1")
    assert (await p.probe("ours.test", "grey@ours.test")).answer is ProbeAnswer.TEMPFAIL
    assert (await p.probe("ours.test", "policy@ours.test")).answer is ProbeAnswer.TEMPFAIL
    assert primary.received == []  # a probe never sends DATA


async def test_null_sender_refused_is_tempfail(primary: Primary) -> None:
    primary.mail_reply = "550 5.7.1 we do not take bounces"
    assert (await prober(at(primary.port)).probe("ours.test", "alice@ours.test")).answer is ProbeAnswer.TEMPFAIL


async def test_nothing_listening_then_next_target(primary: Primary) -> None:
    closed = free_port()
    res = await prober(at(closed)).probe("ours.test", "alice@ours.test")
    assert res.answer is ProbeAnswer.TEMPFAIL and not res.answered
    res = await prober(at(closed), at(primary.port)).probe("ours.test", "nobody@ours.test")
    assert res.answer is ProbeAnswer.UNKNOWN


async def test_black_hole_is_bounded() -> None:
    hole = BlackHole()
    try:
        t0 = time.monotonic()
        res = await prober(at(hole.port), timeout=0.5).probe("ours.test", "alice@ours.test")
        assert res.answer is ProbeAnswer.TEMPFAIL
        assert time.monotonic() - t0 < 3.0
    finally:
        hole.close()


async def test_no_route() -> None:
    res = await prober().probe("ours.test", "alice@ours.test")
    assert res.answer is ProbeAnswer.TEMPFAIL and "no route" in res.detail


async def test_starttls_opportunistic_and_verified(tmp_path: Path) -> None:
    _cert, ctx = self_signed(tmp_path)
    p = await Primary(tls_context=ctx).start()
    p.rcpt_rule = rule
    try:
        res = await prober(at(p.port)).probe("ours.test", "alice@ours.test")
        assert res.answer is ProbeAnswer.KNOWN  # self-signed is fine when not verifying
        res = await prober(at(p.port), tls_verify=True).probe("ours.test", "alice@ours.test")
        assert res.answer is ProbeAnswer.TEMPFAIL and "TLS" in res.detail  # verification fails: cannot tell
    finally:
        await p.stop()


async def test_tls_verify_without_starttls(primary: Primary) -> None:
    res = await prober(at(primary.port), tls_verify=True).probe("ours.test", "alice@ours.test")
    assert res.answer is ProbeAnswer.TEMPFAIL and "STARTTLS" in res.detail


def test_make_test_cert_script(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(REPO / "scripts" / "make-test-cert"), "--name", "backup.test", "--days", "2", str(tmp_path / "tls")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "Fingerprint" in out.stdout
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    text = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-text"], capture_output=True, text=True, check=True
    ).stdout
    assert "DNS:backup.test" in text and "IP Address:127.0.0.1" in text
    bad = subprocess.run(
        [str(REPO / "scripts" / "make-test-cert"), "--name", "bad name", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
