"""Header edits of rspamd's milter block applied to a stored message (filter/edit.py, filter/rspamd.py)."""

from __future__ import annotations

from typing import Any

import pytest

from backupmx.filter.edit import HeaderEdits, apply_edits
from backupmx.filter.rspamd import edits_of
from backupmx.spool.body import BodyBuffer

MSG = (
    b"Received: from a\r\n\tby b\r\nX-Spam: forged\r\nSubject: hi\r\nX-Spam: again\r\n\r\nbody X-Spam: not a header\r\n"
)


def edited(edits: HeaderEdits, msg: bytes = MSG) -> bytes:
    with BodyBuffer.from_bytes(msg) as body:
        out = apply_edits(body, edits, None)
        try:
            return out.getvalue()
        finally:
            if out is not body:
                out.close()


@pytest.mark.parametrize(
    ("remove", "left"),
    [
        ((("x-spam", 0),), []),
        ((("X-Spam", 1),), [b"X-Spam: again"]),
        ((("X-Spam", -1),), [b"X-Spam: forged"]),
        ((("X-Spam", 3),), [b"X-Spam: forged", b"X-Spam: again"]),
    ],
)
def test_remove(remove: tuple[tuple[str, int], ...], left: list[bytes]) -> None:
    out = edited(HeaderEdits(remove=remove))
    head, _, body = out.partition(b"\r\n\r\n")
    assert [f for f in head.split(b"\r\n") if f.startswith(b"X-Spam")] == left
    assert body == b"body X-Spam: not a header\r\n"
    assert head.startswith(b"Received: from a\r\n\tby b\r\n")  # folded field kept whole


def test_add_order_and_sanitised_values() -> None:
    out = edited(HeaderEdits(add=(("X-Top", "1", 0), ("X-End", "a\r\n\tfolded\nbare", -1))))
    head = out.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"X-Top: 1"
    assert head[-2:] == [b"X-End: a", b"\tfolded bare"]  # folding kept, the bare LF is not a new field


def test_subject_rewrite_and_header_only_message() -> None:
    out = edited(HeaderEdits(subject="*** SPAM *** hi"))
    assert out.count(b"Subject:") == 1 and b"Subject: *** SPAM *** hi\r\n" in out
    out = edited(HeaderEdits(add=(("X-A", "b", -1),)), b"Subject: only\r\n")
    assert out == b"Subject: only\r\nX-A: b\r\n\r\n"


@pytest.mark.parametrize(
    ("reply", "adds", "subject"),
    [
        ({"action": "add header"}, [("X-Spam", "Yes", -1)], None),
        ({"action": "add header", "milter": {"add_headers": {"X-Spam": "yes"}}}, [("X-Spam", "yes", -1)], None),
        ({"action": "rewrite subject", "subject": "[SPAM] x"}, [], "[SPAM] x"),
        (
            {
                "action": "no action",
                "milter": {
                    "add_headers": {"X-A": [{"value": "1", "order": 0}, "2"], "Bad Name": "x", "X-B": {"value": 3}}
                },
            },
            [("X-A", "1", 0), ("X-A", "2", -1)],
            None,
        ),
    ],
)
def test_edits_of_reply(reply: dict[str, Any], adds: list[tuple[str, str, int]], subject: str | None) -> None:
    e = edits_of(reply)
    assert list(e.add) == adds and e.subject == subject
