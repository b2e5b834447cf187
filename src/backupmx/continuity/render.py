"""Reading a stored message for the emergency inbox: the summary of a list row (sender, subject, date)
from the header alone, and the full view: the text part, the HTML part made safe, the attachments.

HTML is never shown as sent. `safe_html` passes it through nh3 (ammonia) with an allow-list of tags,
attributes and CSS properties: scripts, event handlers, forms, frames, <style>, <base>, <meta>, and any
URL but http(s)/mailto links are dropped; images keep only `data:` sources (the message's own cid:
parts are inlined as data: URIs), so nothing remote is ever fetched. The result is served as its own
document under `FRAME_CSP` (no script, no network) inside an iframe sandboxed without allow-scripts:
each layer alone stops the attacks the tests try.
Parsing never raises on a damaged message: bad charsets and headers degrade to replacement characters.
Parsing is bounded: `too_large` tells, in one pass of C-speed byte counting, a message above
MAX_VIEW_BYTES or with more than MAX_VIEW_PARTS parts, which is then offered as an .eml download only
(Python's email parser takes seconds for 20,000 small parts).
"""

from __future__ import annotations

import email
import email.policy
import mimetypes
import re
import unicodedata
from base64 import b64encode
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from email.message import Message
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any, Protocol

import nh3

HEAD_LIMIT = 64 * 1024  # a list row reads at most this much of a message
MAX_VIEW_BYTES = 25 * 1024 * 1024  # a bigger message is not parsed for the view: download the .eml
MAX_VIEW_PARTS = 500  # nor one with more parts than this (real mail has a few dozen at most)
INLINE_IMAGE_MAX = 2 * 1024 * 1024  # one cid: image inlined as data:, at most
INLINE_TOTAL_MAX = 10 * 1024 * 1024
INLINE_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})  # never SVG

FRAME_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'self'; "
    "sandbox allow-popups allow-popups-to-escape-sandbox"
)

# Microsoft's names for Korean and Chinese charsets, and what they really mean.
_CHARSET_ALIASES = {
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "euc-kr": "cp949",
    "ksc5601": "cp949",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "iso-8859-1": "cp1252",
    "us-ascii": "ascii",
    "unicode-1-1-utf-7": "utf-7",
}


class BodySource(Protocol):
    def iter_body(self, message_id: Any, chunk_size: int = ...) -> AsyncIterator[bytes]: ...


# --- text clean-up ----------------------------------------------------------------------------------
def _decode_bytes(data: bytes, charset: str | None) -> str:
    cs = (charset or "").strip().strip('"').lower()
    cs = _CHARSET_ALIASES.get(cs, cs)
    if cs in ("", "ascii"):
        try:
            return data.decode("utf-8")  # undeclared 8-bit text is most often UTF-8
        except UnicodeDecodeError:
            return data.decode("cp949" if _looks_korean(data) else "cp1252", errors="replace")
    try:
        return data.decode(cs, errors="replace")
    except LookupError:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("cp1252", errors="replace")


def _looks_korean(data: bytes) -> bool:
    try:
        text = data.decode("cp949")
    except UnicodeDecodeError:
        return False
    return any("\uac00" <= ch <= "\ud7a3" for ch in text)


def clean_text(value: str, limit: int = 998) -> str:
    """One line for display: raw 8-bit bytes recovered, control characters and bidi overrides gone."""
    if any("\udc80" <= ch <= "\udcff" for ch in value):  # undecoded 8-bit bytes in a header
        raw = value.encode("utf-8", "surrogateescape")
        value = _decode_bytes(raw, None)
    out = []
    for ch in value:
        cat = unicodedata.category(ch)
        if ch in "\t\r\n":
            out.append(" ")
        elif cat in ("Cc", "Cs") or ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069":
            continue
        else:
            out.append(ch)
    text = re.sub(r"\s+", " ", "".join(out)).strip()
    return text[:limit]


def _header(msg: Message, name: str) -> str:
    raw = _raw_header(msg, name)
    if any("\udc80" <= ch <= "\udcff" for ch in raw):  # raw 8-bit bytes: the parser would lose them
        return clean_text(raw)
    try:
        value = msg.get(name)
    except Exception:  # a header the parser cannot make sense of
        value = None
    if value is None:
        return clean_text(raw) if raw else ""
    try:
        return clean_text(str(value))
    except Exception:
        return clean_text(raw)


def _raw_header(msg: Message, name: str) -> str:
    for k, v in msg.raw_items() if hasattr(msg, "raw_items") else msg.items():
        if k.lower() == name.lower():
            return str(v)
    return ""


@dataclass(frozen=True, slots=True)
class Person:
    name: str
    address: str

    @property
    def label(self) -> str:
        return self.name or self.address or "?"


def _people(value: str) -> list[Person]:
    try:
        pairs = getaddresses([value])
    except Exception:
        return [Person(value, "")] if value else []
    out = [Person(clean_text(n, 200), clean_text(a, 320)) for n, a in pairs if n or a]
    return out or ([Person(value, "")] if value else [])


def _date(value: str) -> datetime | None:
    if not value:
        return None
    try:
        d = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return d if d.tzinfo is not None else None


# --- list rows ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Summary:
    sender: Person | None
    subject: str
    date: datetime | None
    has_attachments: bool  # a guess from the header: multipart/mixed or /related with a filename


def summarize(head: bytes) -> Summary:
    """The list row from the header (and whatever of the body came with it)."""
    header, sep, rest = head.partition(b"\r\n\r\n")
    if not sep:
        header, sep, rest = head.partition(b"\n\n")
    msg = email.message_from_bytes(header + b"\r\n\r\n", policy=email.policy.default)
    people = _people(_header(msg, "From"))
    ctype = msg.get_content_type()
    attach = ctype == "multipart/mixed" and (b"filename" in rest.lower() or b"name=" in rest.lower())
    return Summary(people[0] if people else None, _header(msg, "Subject"), _date(_header(msg, "Date")), attach)


async def read_head(spool: BodySource, message_id: Any, limit: int = HEAD_LIMIT) -> bytes:
    """The first `limit` bytes at most (the header, usually whole), read in chunks and closed early."""
    out = bytearray()
    chunks = spool.iter_body(message_id, 16 * 1024)
    try:
        async for chunk in chunks:
            out += chunk
            if len(out) >= limit or b"\r\n\r\n" in out:
                break
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    return bytes(out[:limit])


# --- the full view ------------------------------------------------------------------------------------
_BOUNDARY = re.compile(rb"""boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))""", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class TooLarge:
    """A message the view does not parse, and why (shown to the reader with the .eml link)."""

    size: int
    parts: int  # an upper bound: delimiter lines of the boundaries the message declares


def too_large(body: bytes, *, max_bytes: int = MAX_VIEW_BYTES, max_parts: int = MAX_VIEW_PARTS) -> TooLarge | None:
    """The message is past the view's budget, or None. Counts delimiter lines of every declared boundary
    (bytes.count, no parsing): an upper bound on the parts, so nothing under the cap is refused by it."""
    if len(body) > max_bytes:
        return TooLarge(len(body), 0)
    boundaries: set[bytes] = set()
    parts = 0
    for m in _BOUNDARY.finditer(body):
        b = m.group(1) or m.group(2)
        if b and b not in boundaries:
            boundaries.add(b)
            parts += body.count(b"\n--" + b) + body.startswith(b"--" + b)
            if parts > max_parts + len(boundaries) or len(boundaries) > max_parts:  # + one closing line each
                return TooLarge(len(body), parts)
    return None


@dataclass(frozen=True, slots=True)
class Attachment:
    index: int  # position of the part in walk order; the URL names it
    filename: str
    content_type: str
    size: int
    content_id: str | None


@dataclass(slots=True)
class ParsedMessage:
    sender: list[Person]
    to: list[Person]
    cc: list[Person]
    subject: str
    date: datetime | None
    text: str | None
    html: str | None
    attachments: list[Attachment]
    inline_images: dict[str, str] = field(default_factory=dict)  # content-id -> data: URI
    _parts: dict[int, Message] = field(default_factory=dict)


def _leaves(msg: Message) -> list[tuple[int, Message]]:
    """Every non-multipart part with its index; an attached message is one leaf, not opened."""
    out: list[tuple[int, Message]] = []
    counter = 0

    def walk(part: Message, depth: int) -> None:
        nonlocal counter
        index = counter
        counter += 1
        if part.is_multipart() and part.get_content_maintype() == "multipart" and depth < 20:
            payload = part.get_payload()
            if isinstance(payload, list):
                for sub in payload:
                    if isinstance(sub, Message):
                        walk(sub, depth + 1)
            return
        out.append((index, part))

    walk(msg, 0)
    return out


def _payload(part: Message) -> bytes:
    if part.get_content_type() == "message/rfc822" or part.is_multipart():
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            return inner[0].as_bytes(policy=email.policy.SMTP)
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    raw = part.get_payload()
    return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""


def _is_attachment(part: Message) -> bool:
    disp = (part.get("Content-Disposition") or "").split(";", 1)[0].strip().lower()
    return disp == "attachment"


def safe_filename(name: str | None, index: int, content_type: str) -> str:
    """A name to save as: no path, no control or quote characters, not empty, at most 120 characters."""
    name = clean_text(name or "", 400)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r'[\x00-\x1f\x7f"<>:|?*;]', "_", name).strip(" .")
    if not name:
        ext = mimetypes.guess_extension(content_type) or ".bin"
        name = f"part-{index}{ext}"
    if len(name) > 120:
        stem, dot, ext = name.rpartition(".")
        name = (stem[:110] + dot + ext[:9]) if dot and len(ext) < 10 else name[:120]
    return name


def parse_message(body: bytes) -> ParsedMessage:
    msg = email.message_from_bytes(body, policy=email.policy.default)
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = []
    parts: dict[int, Message] = {}
    inline: dict[str, str] = {}
    inline_total = 0
    for index, part in _leaves(msg):
        ctype = part.get_content_type()
        data = _payload(part)
        is_att = _is_attachment(part)
        if not is_att and ctype == "text/plain" and text is None:
            text = _decode_bytes(data, part.get_content_charset()).replace("\r\n", "\n")
            continue
        if not is_att and ctype == "text/html" and html is None:
            html = _decode_bytes(data, part.get_content_charset()).replace("\r\n", "\n")
            continue
        cid = (part.get("Content-ID") or "").strip().strip("<>").strip() or None
        if (
            cid
            and ctype in INLINE_IMAGE_TYPES
            and len(data) <= INLINE_IMAGE_MAX
            and inline_total + len(data) <= INLINE_TOTAL_MAX
        ):
            inline[cid] = f"data:{ctype};base64,{b64encode(data).decode('ascii')}"
            inline_total += len(data)
            if not is_att:
                continue  # shown in the HTML where it belongs, not listed as an attachment
        try:
            raw_name = part.get_filename()
        except Exception:
            raw_name = None
        if ctype == "message/rfc822" and not raw_name:
            raw_name = f"message-{index}.eml"
        parts[index] = part
        attachments.append(Attachment(index, safe_filename(raw_name, index, ctype), ctype, len(data), cid))
    return ParsedMessage(
        sender=_people(_header(msg, "From")),
        to=_people(_header(msg, "To")),
        cc=_people(_header(msg, "Cc")),
        subject=_header(msg, "Subject"),
        date=_date(_header(msg, "Date")),
        text=text,
        html=html,
        attachments=attachments,
        inline_images=inline,
        _parts=parts,
    )


def attachment_bytes(parsed: ParsedMessage, index: int) -> tuple[Attachment, bytes] | None:
    part = parsed._parts.get(index)
    if part is None:
        return None
    att = next(a for a in parsed.attachments if a.index == index)
    return att, _payload(part)


# --- HTML made safe -------------------------------------------------------------------------------------
_TAGS = (set(nh3.ALLOWED_TAGS) - {"area", "map"}) | {"font", "center", "big"}
_ATTRIBUTES: dict[str, set[str]] = {k: set(v) for k, v in nh3.ALLOWED_ATTRIBUTES.items()}
_ATTRIBUTES.setdefault("*", set()).update({"style", "dir", "lang", "title", "align", "valign", "bgcolor"})
for _tag in ("table", "td", "th", "tr", "tbody", "thead"):
    _ATTRIBUTES.setdefault(_tag, set()).update(
        {"width", "height", "bgcolor", "border", "cellpadding", "cellspacing", "align", "valign"}
    )
_ATTRIBUTES.setdefault("font", set()).update({"color", "face", "size"})
_STYLE_PROPERTIES = {
    "color",
    "background-color",
    "font",
    "font-family",
    "font-size",
    "font-style",
    "font-weight",
    "font-variant",
    "text-align",
    "text-decoration",
    "text-transform",
    "text-indent",
    "line-height",
    "letter-spacing",
    "word-spacing",
    "white-space",
    "word-break",
    "overflow-wrap",
    "vertical-align",
    "margin",
    "margin-top",
    "margin-right",
    "margin-bottom",
    "margin-left",
    "padding",
    "padding-top",
    "padding-right",
    "padding-bottom",
    "padding-left",
    "border",
    "border-top",
    "border-right",
    "border-bottom",
    "border-left",
    "border-color",
    "border-style",
    "border-width",
    "border-collapse",
    "border-spacing",
    "border-radius",
    "width",
    "max-width",
    "min-width",
    "height",
    "max-height",
    "min-height",
    "display",
    "list-style-type",
    "table-layout",
    "direction",
}
_DANGEROUS_CSS = re.compile(
    r"url\s*\(|expression\s*\(|image-set|@import|behavior|binding|javascript:|\\|"
    r"image\s*\(|element\s*\(|src\s*\(",
    re.IGNORECASE,
)
_REMOTE_REF = re.compile(
    r"""(?:src|srcset|background|poster|data|action)\s*=\s*['"]?\s*(?:https?:)?//"""
    r"""|url\(\s*['"]?\s*(?:https?:)?//|@import""",
    re.IGNORECASE,
)
_DATA_IMAGE = re.compile(r"data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=\s]+", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class SafeHtml:
    html: str
    remote_blocked: bool  # the message referred to remote images or styles, now removed


def safe_html(html: str, inline_images: dict[str, str] | None = None) -> SafeHtml:
    inline = inline_images or {}
    blocked = 0

    def attribute_filter(tag: str, attr: str, value: str) -> str | None:
        nonlocal blocked
        if attr == "style":
            kept = [d for d in value.split(";") if d.strip() and not _DANGEROUS_CSS.search(d)]
            if len(kept) != len([d for d in value.split(";") if d.strip()]):
                blocked += 1
            return ";".join(kept) or None
        if tag == "img" and attr == "src":
            v = value.strip()
            if v[:4].lower() == "cid:":
                return inline.get(v[4:].strip("<>")) or None
            if _DATA_IMAGE.fullmatch(v):
                return v
            blocked += 1
            return None
        if attr in ("href", "cite"):
            v = value.strip()
            if re.match(r"(https?|mailto):", v, re.IGNORECASE):
                return v
            return None
        return value

    cleaned = nh3.clean(
        html,
        tags=_TAGS,
        attributes=_ATTRIBUTES,
        attribute_filter=attribute_filter,
        url_schemes={"http", "https", "mailto", "data", "cid"},
        url_relative="deny",
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
        set_tag_attribute_values={"a": {"target": "_blank"}},
        filter_style_properties=_STYLE_PROPERTIES,
    )
    return SafeHtml(cleaned, blocked > 0 or _REMOTE_REF.search(html) is not None)


FRAME_STYLE = (
    "html{color-scheme:light}body{margin:0;padding:12px 14px;font:15px/1.5 system-ui,-apple-system,"
    "'Segoe UI',Roboto,'Noto Sans KR','Apple SD Gothic Neo','Malgun Gothic',sans-serif;color:#1d232b;"
    "background:#fff;overflow-wrap:anywhere}img{max-width:100%;height:auto}"
    "table{max-width:100%}pre{white-space:pre-wrap}a{color:#0b57d0}"
)


def frame_document(body_html: str, lang: str = "en") -> str:
    """The sandboxed frame's whole document around already-sanitised HTML."""
    return (
        '<!doctype html><html lang="' + ("ko" if lang == "ko" else "en") + '"><head><meta charset="utf-8">'
        '<meta name="referrer" content="no-referrer"><meta name="viewport" '
        'content="width=device-width, initial-scale=1"><style>'
        + FRAME_STYLE
        + "</style></head><body>"
        + body_html
        + "</body></html>"
    )
