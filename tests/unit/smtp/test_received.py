"""The Received header: one header, the queue ID, `for` only with one recipient, HELO never injects."""

from __future__ import annotations

import pytest

from backupmx.smtp.received import protocol_name, received_header, safe_helo

WHEN = 1_700_000_000.0


def hdr(helo: str = "client.test", ip: str = "192.0.2.7", rcpts: list[str] | None = None) -> bytes:
    return received_header(
        helo=helo,
        client_ip=ip,
        hostname="mx.test",
        node="node1",
        protocol="ESMTPS",
        queue_id="QID123",
        recipients=rcpts or ["u@ours.test"],
        when=WHEN,
    )


def test_format() -> None:
    assert hdr() == (
        b"Received: from client.test ([192.0.2.7] [192.0.2.7])\r\n"
        b"\tby mx.test (backupmx node1) with ESMTPS id QID123\r\n"
        b"\tfor <u@ours.test>; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    )


def test_no_for_with_two_recipients_and_ipv6() -> None:
    h = hdr(ip="2001:db8::1", rcpts=["a@ours.test", "b@ours.test"])
    assert b"for" not in h
    assert h.startswith(b"Received: from client.test ([IPv6:2001:db8::1] [2001:db8::1])\r\n")
    assert h.endswith(b"id QID123; Tue, 14 Nov 2023 22:13:20 +0000\r\n")


@pytest.mark.parametrize("helo", ["foo\rX-Injected: yes", "foo\r\nX-Injected: yes", "a(b)c;d", "x" * 300, "", "é.test"])
def test_helo_never_injects(helo: str) -> None:
    h = hdr(helo=helo)
    assert h.count(b"\r\n") == 3 and h.count(b"\n") == 3 and h.count(b"\r") == 3
    assert b"X-Injected:" not in h and not any(ln.startswith(b"X-") for ln in h.split(b"\r\n"))
    first = h.split(b"\r\n")[0]
    assert first.startswith(b"Received: from ") and b"(" not in first[15 : first.index(b" (")]


def test_safe_helo_keeps_valid_names() -> None:
    assert safe_helo("[192.0.2.1]") == "[192.0.2.1]"
    assert safe_helo("Mail.Example.TEST") == "Mail.Example.TEST"
    assert safe_helo("bad name") == "bad_name"
    assert safe_helo("") == "unknown"


def test_protocol_names() -> None:
    assert protocol_name(extended=True, tls=False, smtputf8=False) == "ESMTP"
    assert protocol_name(extended=True, tls=True, smtputf8=False) == "ESMTPS"
    assert protocol_name(extended=False, tls=False, smtputf8=False) == "SMTP"
    assert protocol_name(extended=True, tls=True, smtputf8=True) == "UTF8SMTPS"


def test_cached_parts_follow_each_call() -> None:
    """The from/by parts and the date are cached: each call still shows its own client, HELO and second."""
    a = hdr(helo="a.test", ip="192.0.2.1")
    b = hdr(helo="b.test", ip="192.0.2.2")
    assert a.startswith(b"Received: from a.test ([192.0.2.1] [192.0.2.1])")
    assert b.startswith(b"Received: from b.test ([192.0.2.2] [192.0.2.2])")
    later = received_header(
        helo="a.test",
        client_ip="192.0.2.1",
        hostname="mx2.test",
        node="n2",
        protocol="ESMTP",
        queue_id="Q2",
        recipients=["u@ours.test"],
        when=WHEN + 61.9,
    )
    assert b"\tby mx2.test (backupmx n2) with ESMTP id Q2\r\n" in later
    assert later.endswith(b"; Tue, 14 Nov 2023 22:14:21 +0000\r\n")  # whole seconds, as format_datetime
