"""An independent reader of the mail log's text format (backupmx.maillog.format_text), for tests: a
line must parse back to exactly the fields written, or ParseError. Bare values are printable ASCII without
`"\\,=<>`; anything else is a JSON string; `<...>` holds a bare or JSON-quoted address, and `<a>,<b>`
is a list. Fields are separated by `, ` outside quotes."""

from __future__ import annotations

import json
import re

BARE = set(chr(c) for c in range(0x21, 0x7F)) - set('"\\,=<>')
_DECODER = json.JSONDecoder()


class ParseError(ValueError):
    pass


def _string(s: str, i: int) -> tuple[str, int]:
    if s[i : i + 1] != '"':
        raise ParseError(f"no string at {i}: {s[i : i + 20]!r}")
    value, end = _DECODER.raw_decode(s, i)
    assert isinstance(value, str)
    return value, end


def _bare(s: str, i: int) -> tuple[str, int]:
    j = i
    while j < len(s) and s[j] in BARE:
        j += 1
    return s[i:j], j


def _token(s: str, i: int) -> tuple[str, int]:
    return _string(s, i) if s[i : i + 1] == '"' else _bare(s, i)


def _value(s: str, i: int) -> tuple[str, int]:
    if s[i : i + 1] != "<":
        return _token(s, i)
    items = []
    while True:
        inner, i = _token(s, i + 1)
        if s[i : i + 1] != ">":
            raise ParseError(f"unclosed <...> at {i}")
        i += 1
        items.append(f"<{inner}>")
        if s[i : i + 2] != ",<":
            return ",".join(items), i
        i += 1


def parse(line: str) -> tuple[str, str, str | None, dict[str, str]]:
    """(node, event, queue_id, fields) of one text line; raises ParseError on anything else."""
    m = re.match(r"\S+ ", line)
    if not m:
        raise ParseError("no timestamp")
    node, i = _token(line, m.end())
    m = re.compile(r" backupmx/([a-z-]+):").match(line, i)
    if not m:
        raise ParseError(f"no event at {i}")
    event, i = m.group(1), m.end()
    qid = None
    fields: dict[str, str] = {}
    if i == len(line):
        return node, event, qid, fields
    if line[i] != " ":
        raise ParseError("no space after the event")
    i += 1
    m = re.compile(r"([A-Za-z0-9]+): ").match(line, i)
    if m:
        qid, i = m.group(1), m.end()
    elif line[i] == '"':
        quoted, j = _string(line, i)
        if line[j : j + 2] == ": ":
            qid, i = quoted, j + 2
    while True:
        key, i = _token(line, i)
        if line[i : i + 1] != "=":
            raise ParseError(f"no '=' after {key!r}")
        value, i = _value(line, i + 1)
        if key in fields:
            raise ParseError(f"{key} twice")
        fields[key] = value
        if i == len(line):
            return node, event, qid, fields
        if line[i : i + 2] != ", ":
            raise ParseError(f"junk at {i}: {line[i : i + 20]!r}")
        i += 2
