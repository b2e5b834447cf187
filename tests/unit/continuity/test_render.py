"""Parsing and safe rendering (render.py): which part is shown, charsets, attachments, hostile HTML
reduced to harmless markup, and names that are safe to save as."""

from __future__ import annotations

import re

import pytest

from backupmx.continuity.render import attachment_bytes, parse_message, safe_filename, safe_html, summarize
from tests.unit.continuity import mail

EVIL = "http://127.0.0.1:9"


def test_plain_message() -> None:
    p = parse_message(mail.plain())
    assert p.subject == "Plain hello" and p.sender[0].name == "Bob" and p.sender[0].address == "bob@else.test"
    assert p.text is not None and "plain text" in p.text and p.html is None and p.attachments == []
    assert p.date is not None and p.date.isoformat() == "2026-11-24T09:15:00+00:00"


def test_multipart_with_attachments_and_an_inline_image() -> None:
    p = parse_message(mail.multipart())
    assert p.text == "Please find the contract attached.\n"
    assert p.html is not None and "cid:logo@else.test" in p.html
    names = {a.filename: a for a in p.attachments}
    assert {"contract 2026.pdf", "요약.txt"} <= set(names)
    assert p.inline_images["logo@else.test"].startswith("data:image/png;base64,")
    found = attachment_bytes(p, names["contract 2026.pdf"].index)
    assert found is not None and found[1] == b"%PDF-1.4\n% a tiny contract\n"
    assert attachment_bytes(p, 999) is None
    out = safe_html(p.html, p.inline_images)
    assert 'src="data:image/png;base64,' in out.html and not out.remote_blocked


@pytest.mark.parametrize("charset", ["ks_c_5601-1987", "euc-kr", "cp949"])
def test_korean_legacy_charsets(charset: str) -> None:
    p = parse_message(mail.korean(charset=charset))
    assert p.subject == "회의 일정 안내" and p.sender[0].name == "김철수"
    assert p.text is not None and "다음 주 회의는 화요일" in p.text


def test_raw_8bit_headers_and_unknown_charsets_degrade_not_fail() -> None:
    body = (
        b"Subject: " + "안녕하세요".encode("cp949") + b"\r\nFrom: x@y.test\r\n"
        b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\n" + "본문".encode() + b"\r\n"
    )
    p = parse_message(body)
    assert p.subject == "안녕하세요"
    assert p.text is not None and "본문" in p.text
    s = summarize(body)
    assert s.subject == "안녕하세요"


def test_header_tricks_are_cleaned() -> None:
    body = (
        b"From: =?UTF-8?B?" + __import__("base64").b64encode("Bank\u202egnp.exe".encode()) + b"?= <a@b.test>\r\n"
        b"Subject: line\r\n =?UTF-8?Q?one=0D=0Atwo?=\r\n\r\nx\r\n"
    )
    p = parse_message(body)
    assert "\u202e" not in p.sender[0].name
    assert "\r" not in p.subject and "\n" not in p.subject


def test_summary_reads_the_header_only() -> None:
    s = summarize(mail.multipart()[:2000])
    assert s.subject == "Contract and logo" and s.sender is not None and s.sender.name == "Carol"


def test_hostile_html_keeps_its_text_and_loses_everything_active() -> None:
    p = parse_message(mail.hostile(EVIL))
    assert p.html is not None
    out = safe_html(p.html, p.inline_images)
    html = out.html.lower()
    assert "totally normal invoice" in html and "red text" in html
    assert out.remote_blocked
    for needle in (
        "<script",
        "onload",
        "onerror",
        "ontoggle",
        "onfocus",
        "javascript",
        "expression",
        "url(",
        "<form",
        "<input",
        "<iframe",
        "<object",
        "<embed",
        "<video",
        "<audio",
        "<svg",
        "<meta",
        "<base",
        "<link",
        "<style",
        "behavior",
        "srcset=",
        "background=",
        "data:text",
        "127.0.0.1:9",
        "<math",
        "relative.png",
    ):
        assert needle not in html, needle
    assert re.findall(r'href="([^"]*)"', out.html) == []  # the javascript:, encoded and data: links lost href


def test_links_open_outside_without_referrer() -> None:
    out = safe_html('<a href="https://example.org/x">x</a><a href="mailto:a@b.test">m</a>')
    assert out.html.count('target="_blank"') == 2
    assert out.html.count('rel="noopener noreferrer nofollow"') == 2


def test_only_data_images_of_safe_types_survive() -> None:
    svg = "data:image/svg+xml;base64,PHN2Zz48c2NyaXB0PmFsZXJ0KDEpPC9zY3JpcHQ+PC9zdmc+"
    out = safe_html(f'<img src="{svg}"><img src="data:image/png;base64,AAAA"><img src="cid:missing">')
    assert "svg" not in out.html and out.html.count("<img") == 3 and out.html.count("src=") == 1


@pytest.mark.parametrize(
    ("raw", "expect"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Windows\\evil.exe", "evil.exe"),
        ('"><img src=x onerror=alert(1)>.html', "___img src=x onerror=alert(1)_.html"),
        ("", "part-3.pdf"),
        ("...", "part-3.pdf"),
        ("a\r\nb.txt", "a b.txt"),
        ("x" * 300 + ".pdf", "x" * 110 + ".pdf"),
    ],
)
def test_safe_filenames(raw: str, expect: str) -> None:
    assert safe_filename(raw, 3, "application/pdf") == expect
