"""The emergency inbox photographed in headless Chromium, desktop in English and phone in Korean, five
hours into an outage of example.com's mail service: Jiwoo's held mail (bank notice, travel booking with
an inline logo, an invoice with attachments, mail from colleagues in Korean), the sign-in page, a
message, and the page shown while the inbox is closed. Set BACKUPMX_SCREENSHOTS=docs to refresh
docs/continuity-*.png; otherwise the pictures go to a temp dir and the test only checks what each page
shows."""

from __future__ import annotations

import base64
import os
import struct
import time
import zlib
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from tests.scenarios.test_continuity_browser import context
from tests.support.chromium import launched_chromium, needs_chromium
from tests.unit.continuity.harness import put, running_inbox

pytestmark = needs_chromium
REPO = Path(__file__).resolve().parents[2]
ME = "jiwoo.park@example.com"


def png(width: int, height: int, rgb: tuple[int, int, int], stripe: tuple[int, int, int]) -> bytes:
    """A small banner: a flat colour with a lighter band, as a real PNG."""
    rows = b""
    for y in range(height):
        colour = stripe if height // 3 <= y < height // 3 + 4 else rgb
        rows += b"\x00" + bytes(colour) * width

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def message(
    sender: str,
    subject: str,
    minutes_ago: int,
    *,
    text: str,
    html: str | None = None,
    attachments: tuple[tuple[str, str, bytes], ...] = (),
    logo: bytes | None = None,
    cc: str | None = None,
) -> bytes:
    m = EmailMessage(policy=SMTP)
    m["From"] = sender
    m["To"] = f"Jiwoo Park <{ME}>"
    if cc:
        m["Cc"] = cc
    m["Subject"] = subject
    m["Date"] = format_datetime(datetime.fromtimestamp(time.time() - minutes_ago * 60, UTC))
    m["Message-ID"] = f"<{abs(hash(subject))}@mail.example.net>"
    m.set_content(text)
    if html is not None:
        m.add_alternative(html, subtype="html")
        if logo is not None:
            m.get_payload()[1].add_related(logo, maintype="image", subtype="png", cid="<logo@jejuair.example>")
    for name, ctype, data in attachments:
        maintype, subtype = ctype.split("/")
        m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return m.as_bytes()


def korean_legacy(sender_name: str, sender: str, subject: str, minutes_ago: int, text: str) -> bytes:
    date = format_datetime(datetime.fromtimestamp(time.time() - minutes_ago * 60, UTC))
    enc = base64.b64encode(subject.encode("cp949")).decode()
    name = base64.b64encode(sender_name.encode()).decode()
    return (
        f"From: =?UTF-8?B?{name}?= <{sender}>\r\nTo: {ME}\r\nSubject: =?ks_c_5601-1987?B?{enc}?=\r\n"
        f'Date: {date}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset="ks_c_5601-1987"\r\n'
        f"Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + text.replace("\n", "\r\n").encode("cp949")


def mailbag() -> list[bytes]:
    """Oldest first, as they arrived during the outage."""
    logo = png(160, 40, (255, 102, 0), (255, 190, 140))
    return [
        message(
            "Weekly Digest <digest@news.example.org>",
            "Your weekly digest: 5 stories",
            292,
            text="Five stories this week.\n",
            html='<h2>Five stories this week</h2><img src="https://cdn.news.example.org/hero.jpg" '
            'alt="[image: this week\'s cover]" width="600"><p>1. City opens a new library...</p>',
        ),
        korean_legacy(
            "김민준",
            "minjun.kim@partner.example.co.kr",
            "회의 일정 안내",
            251,
            "박지우 님, 안녕하세요.\n\n다음 주 회의는 화요일 오후 2시, 본사 3층 회의실에서 진행합니다.\n"
            "참석 여부를 회신 부탁드립니다.\n\n김민준 드림\n",
        ),
        message(
            "Accounts <billing@cloudhost.example>",
            "Invoice 2026-1184 for November",
            203,
            text="Dear customer,\n\nplease find attached invoice 2026-1184 (KRW 1,284,000), due on 10 December.\n"
            "The usage report for November is attached as a spreadsheet.\n\nCloudhost billing\n",
            attachments=(
                ("Invoice-2026-1184.pdf", "application/pdf", b"%PDF-1.4\n% invoice\n" + b"0" * 48_000),
                ("usage-2026-11.csv", "text/csv", b"day,gb\n" + b"2026-11-01,12.4\n" * 3000),
            ),
        ),
        message(
            "Jeju Air <booking@jejuair.example>",
            "Your booking is confirmed: Gimpo → Jeju, 28 Nov",
            164,
            text="Booking JJ7C2K confirmed. Gimpo (GMP) 09:10 -> Jeju (CJU) 10:20, 28 Nov 2026.\n",
            html='<div style="max-width:560px;font-family:sans-serif"><p><img src="cid:logo@jejuair.example" '
            'alt="Jeju Air" width="160" height="40"></p><h2 style="color:#ff6600">Booking '
            "confirmed</h2><p>Dear Jiwoo Park, thank you for flying with us.</p>"
            '<table cellpadding="6" style="border-collapse:collapse;width:100%">'
            '<tr style="background-color:#fff1e6"><th align="left">Flight</th><td>7C 101</td></tr>'
            '<tr><th align="left">From</th><td>Gimpo (GMP) 09:10</td></tr>'
            '<tr style="background-color:#fff1e6"><th align="left">To</th><td>Jeju (CJU) 10:20</td></tr>'
            '<tr><th align="left">Date</th><td>Saturday, 28 November 2026</td></tr>'
            '<tr style="background-color:#fff1e6"><th align="left">Booking</th>'
            "<td><b>JJ7C2K</b></td></tr></table><p>Check in online from 48 hours before departure at "
            '<a href="https://www.jejuair.example/checkin">jejuair.example/checkin</a>.</p></div>',
            logo=logo,
        ),
        message(
            "Sarah Lee <sarah.lee@partner.example>",
            "Re: Q4 budget review",
            97,
            cc="Minjun Kim <minjun.kim@partner.example.co.kr>",
            text="Hi Jiwoo,\n\nthanks for the draft. Two comments on the marketing line, see the sheet.\n"
            "Can we settle it before Friday?\n\nSarah\n",
            attachments=(
                (
                    "Q4-budget-v3.xlsx",
                    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                    b"PK\x03\x04" + b"\x00" * 31_000,
                ),
            ),
        ),
        korean_legacy(
            "동창회",
            "alumni@band.example.kr",
            "[동창회] 12월 송년 모임 안내",
            58,
            "올해 송년 모임은 12월 19일(토) 저녁 6시 강남역 근처에서 열립니다.\n자세한 장소는 추후 안내드리겠습니다.\n",
        ),
        message(
            "KB국민은행 <alert@kbstar.example>",
            "[KB국민은행] 입출금 거래 알림",
            12,
            text="박지우 고객님, 11월 24일 입금 1,500,000원이 처리되었습니다.\n",
            html="<p><b>박지우</b> 고객님,</p><p>11월 24일 <b>입금 1,500,000원</b>이 처리되었습니다.</p>"
            '<p style="color:#666666">본 메일은 발신 전용입니다.</p>',
        ),
    ]


async def test_screenshots_of_the_emergency_inbox(tmp_path: Path) -> None:
    target = REPO / "docs" if os.environ.get("BACKUPMX_SCREENSHOTS") == "docs" else tmp_path / "shots"
    target.mkdir(parents=True, exist_ok=True)
    async with running_inbox(tmp_path, domains=("example.com",), timezone="Asia/Seoul") as inbox:
        ids = [await put(inbox.spool, [ME], body) for body in mailbag()]
        async with launched_chromium() as browser:
            await shoot(browser, inbox, ids, target)


async def shoot(browser: Any, inbox: Any, ids: list[str], target: Path) -> None:
    desk_ctx, watch = await context(
        browser, width=1280, height=800, locale="en-GB", extra_http_headers={"Accept-Language": "en-GB,en;q=0.9"}
    )
    desk = await desk_ctx.new_page()
    await desk.goto(inbox.url + "/")
    assert await desk.inner_text("#notice h1") == "The emergency inbox is closed"
    await desk.screenshot(path=str(target / "continuity-closed.png"))

    inbox.open("example.com", since=time.time() - (5 * 3600 + 12 * 60))
    await desk.goto(f"{inbox.url}/signin?t={await inbox.link(ME, expires_in=7 * 86400)}")
    await desk.screenshot(path=str(target / "continuity-signin.png"))
    await desk.click("#signin")
    await desk.wait_for_selector("ol.messages")
    assert await desk.inner_text("#held-count") == "7 messages"
    await desk.screenshot(path=str(target / "continuity-inbox.png"))

    await desk.click(f"#m-{ids[3]} a")  # the booking: HTML with the inline logo
    frame = desk.frame_locator("iframe.body")
    assert await frame.locator("h2").inner_text() == "Booking confirmed"
    assert await frame.locator("img").evaluate("img => img.naturalWidth") == 160
    await desk.screenshot(path=str(target / "continuity-message.png"))

    await desk.goto(inbox.url + "/")
    await desk.click(f"#m-{ids[2]} a")  # the invoice: text and two attachments
    assert await desk.locator(".attachments li").count() == 2
    await desk.screenshot(path=str(target / "continuity-attachments.png"), full_page=True)

    await desk.goto(inbox.url + "/")
    await desk.click(f"#m-{ids[0]} a")  # remote images blocked
    assert await desk.is_visible("#remote-blocked")

    phone_ctx, phone_watch = await context(
        browser,
        width=390,
        height=844,
        device_scale_factor=2,
        locale="ko-KR",
        is_mobile=True,
        has_touch=True,
        extra_http_headers={"Accept-Language": "ko-KR,ko;q=0.9"},
    )
    phone = await phone_ctx.new_page()
    await phone.goto(f"{inbox.url}/signin?t={await inbox.link(ME)}")
    await phone.click("#signin")
    await phone.wait_for_selector("ol.messages")
    assert await phone.inner_text("#held-count") == "7통"
    assert await phone.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    await phone.screenshot(path=str(target / "continuity-phone-inbox-ko.png"))
    await phone.click(f"#m-{ids[1]} a")  # 회의 일정 안내, ks_c_5601-1987
    assert await phone.inner_text("h1.subject") == "회의 일정 안내"
    await phone.screenshot(path=str(target / "continuity-phone-message-ko.png"))
    assert watch.dialogs == phone_watch.dialogs == []
    assert watch.foreign(inbox.url) == phone_watch.foreign(inbox.url) == []
    await desk_ctx.close()
    await phone_ctx.close()
