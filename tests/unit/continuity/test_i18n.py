"""Interface text: the language choice, both languages complete, dates in each language's way."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from backupmx.continuity.i18n import MESSAGES, Translator, choose


@pytest.mark.parametrize(
    ("header", "lang"),
    [
        (None, "en"),
        ("", "en"),
        ("ko", "ko"),
        ("ko-KR", "ko"),
        ("ko-KR,ko;q=0.9,en-US;q=0.8", "ko"),
        ("en-US,en;q=0.9,ko;q=0.8", "en"),
        ("fr,ko;q=0.5", "ko"),
        ("fr,de", "en"),
        ("ko;q=0,en;q=0.1", "en"),
        ("en;q=0.5,ko;q=0.5", "en"),
        ("ko;q=banana", "en"),
        ("*", "en"),
    ],
)
def test_choose(header: str | None, lang: str) -> None:
    assert choose(header) == lang


def test_every_key_is_in_both_languages_and_every_template_key_exists() -> None:
    assert set(MESSAGES["en"]) == set(MESSAGES["ko"])
    templates = Path(__file__).parents[3] / "src/backupmx/continuity/templates"
    used: set[str] = set()
    for f in templates.glob("*.html"):
        used |= set(re.findall(r"""\bt\(\s*["']([a-z_]+)["']\s*[,)]""", f.read_text()))
    assert used and used <= set(MESSAGES["en"])


def test_dates_and_sizes() -> None:
    seoul = ZoneInfo("Asia/Seoul")
    when = datetime(2026, 11, 24, 13, 5, tzinfo=UTC)
    now = datetime(2026, 11, 24, 14, 0, tzinfo=UTC)  # 23:00 in Seoul: the same day
    assert Translator("ko").date(when, seoul, now=now) == "22:05"
    assert Translator("ko").date(when, seoul, now=datetime(2026, 12, 1, tzinfo=UTC)) == "11월 24일"
    assert Translator("ko").date(when, seoul, now=datetime(2027, 1, 5, tzinfo=UTC)) == "2026. 11. 24."
    assert Translator("en").date(when, UTC, now=datetime(2026, 12, 1, tzinfo=UTC)) == "24 Nov"
    assert Translator("ko").datetime(when, seoul) == "2026년 11월 24일 22:05 (KST)"
    assert Translator("en").datetime(when, UTC) == "24 Nov 2026 13:05 UTC"
    assert Translator("en").date(None, UTC) == "—"
    assert [Translator.size(n) for n in (999, 1500, 2_500_000)] == ["999 B", "2 KB", "2.5 MB"]
    assert Translator("ko").count(3) == "3통" and Translator("en").count(1) == "1 message"
