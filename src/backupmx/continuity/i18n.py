"""The emergency inbox's words in English and Korean, chosen by the browser's Accept-Language (best
q-value among the languages we have; English otherwise), and dates and sizes written the way each
language writes them. A key missing in one language falls back to English; a missing key is a bug
(KeyError in tests), never a blank on the page."""

from __future__ import annotations

from datetime import datetime, tzinfo

LANGUAGES = ("en", "ko")
DEFAULT = "en"

MESSAGES: dict[str, dict[str, str]] = {
    "en": {
        "brand": "Emergency inbox",
        "title_inbox": "Held mail",
        "banner_title": "The mail service of {domain} is down",
        "banner_since": "since {since}",
        "banner_body": "While it is down, this backup server keeps the mail sent to you, and you can read it "
        "here. Every message will also arrive in your normal mailbox when the service is back. "
        "Nothing here is deleted or marked as read.",
        "banner_opened": "Your mail administrator opened this emergency inbox for {domain}. Every message here "
        "will also arrive in your normal mailbox. Nothing here is deleted or marked as read.",
        "signed_in_as": "Signed in as",
        "sign_out": "Sign out",
        "count": "{n} messages",
        "count_one": "1 message",
        "empty": "No mail is being held for you right now.",
        "col_from": "From",
        "col_subject": "Subject",
        "col_date": "Date",
        "col_size": "Size",
        "no_subject": "(no subject)",
        "unknown_sender": "(unknown sender)",
        "newer": "Newer",
        "older": "Older",
        "page": "Page {n}",
        "back": "All held mail",
        "to": "To",
        "cc": "Cc",
        "attachments": "Attachments",
        "attachment": "attachment",
        "download": "Download",
        "download_eml": "Download the whole message (.eml)",
        "view_text": "Plain text",
        "view_html": "Formatted",
        "remote_blocked": "Remote images and content in this message were blocked to protect your privacy.",
        "empty_body": "This message has no text.",
        "html_frame_title": "Message content",
        "signin_title": "Read your held mail",
        "signin_body": "This link signs you in as {address}. It works only once; after signing in, this browser "
        "stays signed in until {until}.",
        "signin_button": "Sign in",
        "signin_no_password": "You will never be asked for the password of your mailbox here.",
        "link_invalid": "This sign-in link is not valid",
        "link_expired": "This sign-in link has expired",
        "link_used": "This sign-in link has already been used",
        "link_revoked": "Access with this link has been withdrawn",
        "link_closed": "The emergency inbox is closed",
        "refused_help": "A sign-in link works once and only for a short time. Ask your mail administrator for "
        "a new one.",
        "closed_title": "The emergency inbox is closed",
        "closed_body": "It opens only while the mail service is down. Your mail is delivered to your normal "
        "mailbox as usual.",
        "need_link_title": "Sign in with your link",
        "need_link_body": "Open the sign-in link your mail administrator sent you. This page has no password "
        "form: it never asks for the password of your mailbox.",
        "not_found_title": "This message is not available",
        "not_found_body": "It may have been delivered to your normal mailbox already, or the address is not right.",
        "signed_out": "You are signed out.",
        "unavailable": "The backup server cannot read its storage right now. Try again in a minute.",
        "footer": "backupmx emergency inbox · read-only",
        "error_title": "Something went wrong",
        "bad_request": "This request could not be understood.",
        "too_large_title": "Too large to show here",
        "too_large_body": "This message ({size}) is too large or has too many parts to show in the browser. "
        "Download it and open it with your mail program.",
        "slow_down_title": "Too many attempts",
        "slow_down_body": "Too many sign-in links that do not work came from your network. Wait a few minutes, "
        "then open the newest link your mail administrator sent you.",
        "lang_switch": "한국어",
    },
    "ko": {
        "brand": "비상 메일함",
        "title_inbox": "보관 중인 메일",
        "banner_title": "{domain} 메일 서비스에 장애가 발생했습니다",
        "banner_since": "{since}부터",
        "banner_body": "장애 기간 동안 이 백업 서버가 회원님께 온 메일을 안전하게 보관하며, 여기에서 읽을 수 "
        "있습니다. 서비스가 복구되면 모든 메일이 평소 메일함으로도 전달됩니다. 여기에서는 아무것도 "
        "삭제되거나 읽음으로 표시되지 않습니다.",
        "banner_opened": "메일 관리자가 {domain}의 비상 메일함을 열었습니다. 여기의 모든 메일은 평소 메일함으로도 "
        "전달됩니다. 여기에서는 아무것도 삭제되거나 읽음으로 표시되지 않습니다.",
        "signed_in_as": "로그인 계정",
        "sign_out": "로그아웃",
        "count": "{n}통",
        "count_one": "1통",
        "empty": "지금 보관 중인 메일이 없습니다.",
        "col_from": "보낸 사람",
        "col_subject": "제목",
        "col_date": "날짜",
        "col_size": "크기",
        "no_subject": "(제목 없음)",
        "unknown_sender": "(보낸 사람 없음)",
        "newer": "최근 메일",
        "older": "이전 메일",
        "page": "{n}쪽",
        "back": "보관 메일 목록",
        "to": "받는 사람",
        "cc": "참조",
        "attachments": "첨부 파일",
        "attachment": "첨부",
        "download": "다운로드",
        "download_eml": "메일 원본 전체 다운로드 (.eml)",
        "view_text": "텍스트로 보기",
        "view_html": "서식 있게 보기",
        "remote_blocked": "개인정보 보호를 위해 이 메일의 외부 이미지와 콘텐츠를 차단했습니다.",
        "empty_body": "이 메일에는 본문이 없습니다.",
        "html_frame_title": "메일 내용",
        "signin_title": "보관 중인 메일 읽기",
        "signin_body": "이 링크로 {address} 계정에 로그인합니다. 링크는 한 번만 사용할 수 있으며, 로그인하면 이 "
        "브라우저는 {until}까지 로그인 상태로 유지됩니다.",
        "signin_button": "로그인",
        "signin_no_password": "이곳에서는 메일 계정의 비밀번호를 절대 묻지 않습니다.",
        "link_invalid": "올바르지 않은 로그인 링크입니다",
        "link_expired": "로그인 링크의 유효 기간이 지났습니다",
        "link_used": "이미 사용한 로그인 링크입니다",
        "link_revoked": "이 링크의 접근 권한이 취소되었습니다",
        "link_closed": "비상 메일함이 닫혀 있습니다",
        "refused_help": "로그인 링크는 짧은 시간 동안 한 번만 사용할 수 있습니다. 메일 관리자에게 새 링크를 "
        "요청하세요.",
        "closed_title": "비상 메일함이 닫혀 있습니다",
        "closed_body": "비상 메일함은 메일 서비스 장애 중에만 열립니다. 메일은 평소처럼 메일함으로 전달됩니다.",
        "need_link_title": "받은 링크로 로그인하세요",
        "need_link_body": "메일 관리자가 보낸 로그인 링크를 여세요. 이 페이지에는 비밀번호 입력란이 없으며, 메일 "
        "계정의 비밀번호를 절대 묻지 않습니다.",
        "not_found_title": "이 메일을 볼 수 없습니다",
        "not_found_body": "이미 평소 메일함으로 전달되었거나 주소가 올바르지 않습니다.",
        "signed_out": "로그아웃되었습니다.",
        "unavailable": "백업 서버가 지금 저장소를 읽을 수 없습니다. 잠시 후 다시 시도하세요.",
        "footer": "backupmx 비상 메일함 · 읽기 전용",
        "error_title": "문제가 발생했습니다",
        "bad_request": "요청을 처리할 수 없습니다.",
        "too_large_title": "여기에 표시하기에는 너무 큽니다",
        "too_large_body": "이 메일({size})은 너무 크거나 첨부된 부분이 너무 많아 브라우저에서 표시할 수 없습니다. "
        "다운로드하여 메일 프로그램으로 여세요.",
        "slow_down_title": "시도가 너무 많습니다",
        "slow_down_body": "사용할 수 없는 로그인 링크가 사용자의 네트워크에서 너무 많이 열렸습니다. 몇 분 뒤에 메일 "
        "관리자가 보낸 가장 최근 링크를 여세요.",
        "lang_switch": "English",
    },
}


def choose(accept_language: str | None) -> str:
    """The best of LANGUAGES for an Accept-Language header ("ko-KR,ko;q=0.9,en;q=0.8" -> "ko")."""
    best, best_q = DEFAULT, 0.0
    for position, item in enumerate((accept_language or "").split(",")[:20]):
        tag, _, params = item.strip().partition(";")
        primary = tag.strip().lower().split("-", 1)[0]
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if primary in LANGUAGES and q > best_q:
            best, best_q = primary, q - position * 1e-6  # equal q: the earlier one wins
    return best


class Translator:
    def __init__(self, lang: str) -> None:
        self.lang = lang if lang in LANGUAGES else DEFAULT

    def __call__(self, key: str, **values: object) -> str:
        text = MESSAGES[self.lang].get(key) or MESSAGES[DEFAULT][key]
        return text.format(**values) if values else text

    def count(self, n: int) -> str:
        return self("count_one") if n == 1 else self("count", n=n)

    def date(self, when: datetime | None, tz: tzinfo, *, now: datetime | None = None) -> str:
        """Short for a list: the time alone today, else day and month (and year if not this one)."""
        if when is None:
            return "—"
        local = when.astimezone(tz)
        ref = (now or datetime.now(tz)).astimezone(tz)
        if self.lang == "ko":
            if local.date() == ref.date():
                return local.strftime("%H:%M")
            if local.year == ref.year:
                return f"{local.month}월 {local.day}일"
            return f"{local.year}. {local.month}. {local.day}."
        if local.date() == ref.date():
            return local.strftime("%H:%M")
        if local.year == ref.year:
            return local.strftime("%d %b").lstrip("0")
        return local.strftime("%d %b %Y").lstrip("0")

    def datetime(self, when: datetime | None, tz: tzinfo) -> str:
        """In full, with the zone: "24 Nov 2026 20:43 UTC" / "2026년 11월 24일 20:43 (UTC)"."""
        if when is None:
            return "—"
        local = when.astimezone(tz)
        zone = local.tzname() or ""
        if self.lang == "ko":
            return f"{local.year}년 {local.month}월 {local.day}일 {local:%H:%M} ({zone})"
        return f"{local.day} {local:%b %Y %H:%M} {zone}".strip()

    @staticmethod
    def size(n: int) -> str:
        if n < 1000:
            return f"{n} B"
        if n < 1_000_000:
            return f"{n / 1000:.0f} KB"
        return f"{n / 1_000_000:.1f} MB"
