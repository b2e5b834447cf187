"""Strict RFC 5321 paths and ESMTP parameters, as values (the protocol tests cover the replies)."""

from __future__ import annotations

import pytest

from backupmx.smtp.address import (
    AddressError,
    AddressErrorKind,
    Mailbox,
    is_helo_name,
    is_xtext,
    parse_params,
    parse_path,
    split_path,
)


def rcpt(path: str, utf8: bool = False) -> Mailbox | None:
    return parse_path(path, null_ok=False, postmaster_ok=True, utf8=utf8)


@pytest.mark.parametrize(
    "arg,path,params",
    [
        ("<a@b.test>", "<a@b.test>", ""),
        ("<a@b.test> SIZE=1  BODY=7BIT", "<a@b.test>", "SIZE=1  BODY=7BIT"),
        ('<"x>y"@b.test> NOTIFY=NEVER', '<"x>y"@b.test>', "NOTIFY=NEVER"),
        ('<"x\\"y"@b.test>', '<"x\\"y"@b.test>', ""),
        ("  <>", "<>", ""),
    ],
)
def test_split_path(arg: str, path: str, params: str) -> None:
    assert split_path(arg) == (path, params)


@pytest.mark.parametrize("arg", ["a@b.test", "<a@b.test", "<a<b>@c.test>", "<a@b.test>SIZE=1", '<"a>@b.test'])
def test_split_path_refuses(arg: str) -> None:
    with pytest.raises(AddressError) as e:
        split_path(arg)
    assert e.value.kind is AddressErrorKind.SYNTAX


def test_mailbox_values() -> None:
    assert rcpt("<Bob@Example.TEST>") == Mailbox("Bob", "example.test")
    assert rcpt("<@a.test,@b.test:u@c.test>") == Mailbox("u", "c.test")
    assert rcpt('<"u@evil"@ours.test>') == Mailbox('"u@evil"', "ours.test")
    lit = rcpt("<u@[192.0.2.1]>")
    assert lit is not None and lit.is_ip_literal and str(lit) == "u@[192.0.2.1]"
    assert rcpt("<postmaster>") == Mailbox("postmaster", "")
    assert rcpt("<u@x-y.test>") == Mailbox("u", "x-y.test")
    assert rcpt("<u@[tag:content]>") == Mailbox("u", "[tag:content]")
    assert parse_path("<>", null_ok=True, postmaster_ok=False, utf8=False) is None
    assert rcpt("<ü@bücher.test>", utf8=True) == Mailbox("ü", "bücher.test")


@pytest.mark.parametrize(
    "path,kind",
    [
        ("<>", AddressErrorKind.SYNTAX),
        ("<user>", AddressErrorKind.SYNTAX),
        ("<u@@d.test>", AddressErrorKind.SYNTAX),
        ("<u(c)@d.test>", AddressErrorKind.SYNTAX),
        ("<a\x01b@d.test>", AddressErrorKind.SYNTAX),
        ('<"a\rb"@d.test>', AddressErrorKind.SYNTAX),
        ("<a\x7f@d.test>", AddressErrorKind.SYNTAX),
        ("<.a@d.test>", AddressErrorKind.SYNTAX),
        ("<a.@d.test>", AddressErrorKind.SYNTAX),
        ("<a@d..test>", AddressErrorKind.SYNTAX),
        ("<a@d.test.>", AddressErrorKind.SYNTAX),
        ("<a@[300.1.1.1]>", AddressErrorKind.SYNTAX),
        ("<a@[IPv6:1::2::3]>", AddressErrorKind.SYNTAX),
        ("<@a.test:>", AddressErrorKind.SYNTAX),
        ("<" + "x" * 65 + "@d.test>", AddressErrorKind.TOO_LONG),
        ("<a@" + "d" * 252 + ".test>", AddressErrorKind.TOO_LONG),
        ("<ü@d.test>", AddressErrorKind.UTF8),
    ],
)
def test_refused_paths(path: str, kind: AddressErrorKind) -> None:
    with pytest.raises(AddressError) as e:
        rcpt(path)
    assert e.value.kind is kind


def test_postmaster_only_where_allowed() -> None:
    with pytest.raises(AddressError):
        parse_path("<postmaster>", null_ok=True, postmaster_ok=False, utf8=False)
    assert rcpt("<PostMaster>") == Mailbox("PostMaster", "")


def test_params() -> None:
    assert parse_params("SIZE=10 body=8bitmime SMTPUTF8") == [("SIZE", "10"), ("BODY", "8bitmime"), ("SMTPUTF8", None)]
    assert parse_params("") == []
    for bad in ("=x", "-A=1", "A=", "A=b=c", "A=\x01"):
        with pytest.raises(AddressError):
            parse_params(bad)


def test_xtext_and_helo() -> None:
    assert is_xtext("abc+2B+3D") and not is_xtext("a+2b") and not is_xtext("a=b") and not is_xtext("a b")
    assert is_helo_name("mail.example.test") and is_helo_name("[192.0.2.1]") and is_helo_name("[IPv6:::1]")
    assert not is_helo_name("foo bar") and not is_helo_name("[1.2.3]") and not is_helo_name("a_b.test")
