"""Header edits a filter asks for (rspamd's `milter` block), applied to the stored copy of a message.

Removals first, then additions, as a milter MTA applies them: remove index 0 = every field of that
name, n > 0 = the n-th (1-based), n < 0 = the n-th from the end; add order -1 = at the end of the
header section, order n >= 0 = before the n-th field (0 = at the top). Names that are not RFC 5322
field names and values with bare line breaks are sanitised or skipped, never stored as given. Only the
header section is read into memory (at most MAX_HEADER bytes; a message whose header section is longer
is stored unedited); the body is copied in chunks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from backupmx.spool.body import BodyBuffer

MAX_HEADER = 1024 * 1024
_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 §2.2: printable ASCII but ':' (and a sane length)


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    add: tuple[tuple[str, str, int], ...] = ()  # (name, value, order)
    remove: tuple[tuple[str, int], ...] = ()  # (name, index)
    subject: str | None = None  # "rewrite subject": the whole new Subject value

    @property
    def empty(self) -> bool:
        return not self.add and not self.remove and self.subject is None


def _clean_value(value: str) -> str:
    """Keeps folding (CRLF + white space) and turns any other line break into a space: a value must
    never end the header section or start a field of its own."""
    lines = re.split(r"\r\n|\r|\n", value)
    out = lines[0]
    for line in lines[1:]:
        out += ("\r\n" + line) if line[:1] in (" ", "\t") and line.strip() else (" " + line.strip())
    return out.strip()


def _split_fields(header: bytes) -> list[bytes]:
    """The header section (without the empty line) as whole fields, continuation lines included."""
    fields: list[bytes] = []
    for line in header.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _name_of(f: bytes) -> str:
    return f.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def _edit_fields(fields: list[bytes], edits: HeaderEdits) -> list[bytes]:
    removals = list(edits.remove)
    if edits.subject is not None:
        removals.append(("Subject", 0))
    for name, index in removals:
        at = [i for i, f in enumerate(fields) if _name_of(f) == name.lower()]
        if index == 0:
            drop = set(at)
        elif 0 < index <= len(at):
            drop = {at[index - 1]}
        elif index < 0 and -index <= len(at):
            drop = {at[index]}
        else:
            drop = set()
        fields = [f for i, f in enumerate(fields) if i not in drop]
    adds = list(edits.add)
    if edits.subject is not None:
        adds.append(("Subject", edits.subject, -1))
    for name, value, order in adds:
        new = f"{name}: {_clean_value(value)}\r\n".encode("utf-8", "replace")
        if order < 0 or order >= len(fields):
            fields.append(new)
        else:
            fields.insert(order, new)
    return fields


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name))


def apply_edits(body: BodyBuffer, edits: HeaderEdits, tmp_dir: Path | None) -> BodyBuffer:
    """A new body with `edits` applied; `body` is left as it was (the caller closes it). Returns `body`
    itself when there is nothing to do or the header section is too long to edit."""
    if edits.empty:
        return body
    head = b""
    chunks = body.chunks()
    end = -1
    for block in chunks:
        head += block
        end = head.find(b"\r\n\r\n")
        if end >= 0 or len(head) > MAX_HEADER:
            break
    if end < 0 and len(head) > MAX_HEADER:
        return body
    if end < 0:  # a message that is all header (no empty line): the edits go at its end
        header, rest = head, b""
        if header and not header.endswith(b"\r\n"):
            header += b"\r\n"
        separator = b"\r\n"
    else:
        header, rest, separator = head[: end + 2], head[end + 4 :], b"\r\n"
    out = BodyBuffer(tmp_dir)
    try:
        out.write(b"".join(_edit_fields(_split_fields(header), edits)) + separator + rest)
        for block in chunks:
            out.write(block)
    except BaseException:
        out.close()
        raise
    return out


__all__ = ["HeaderEdits", "apply_edits", "valid_name"]
