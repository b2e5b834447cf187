"""`queue export` (export.py): one mailbox per recipient, bodies byte-identical, mboxrd quoting of
"From " lines across chunk boundaries, resumable Maildir and .eml, an existing mbox refused."""

from __future__ import annotations

import io
import mailbox
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backupmx.continuity.export import ExportError, Format, Progress, Selection, count, export
from backupmx.spool.sqlite import SqliteSpool
from tests.unit.continuity import mail
from tests.unit.continuity.harness import put


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    s = SqliteSpool(tmp_path / "data", node="n1")
    await s.open()
    yield s
    await s.close()


def unquote_mboxrd(data: bytes) -> bytes:
    return re.sub(rb"(?m)^>(>*From )", rb"\1", data)


async def test_per_recipient_mailboxes_with_identical_bodies(spool: SqliteSpool, tmp_path: Path) -> None:
    q1 = await put(spool, ["alice@example.test", "bob@example.test"], mail.plain(subject="both"))
    q2 = await put(spool, ["alice@example.test"], mail.multipart())
    await put(spool, ["carol@other.test"], mail.plain(to="carol@other.test"))
    bodies = {q: await spool.read_body(q) for q in (q1, q2)}
    res = await export(spool, Selection(domain="example.test"), Format.MBOX, tmp_path / "mbox")
    assert (res.messages, res.copies) == (2, 3)
    alice = mailbox.mbox(tmp_path / "mbox" / "alice@example.test.mbox", create=False)
    assert [alice.get_bytes(k) for k in alice.iterkeys()] == [bodies[q1], bodies[q2]]
    assert alice[0].get_from().startswith("bob@else.test ")
    bob = mailbox.mbox(tmp_path / "mbox" / "bob@example.test.mbox", create=False)
    assert [bob.get_bytes(k) for k in bob.iterkeys()] == [bodies[q1]]
    assert not (tmp_path / "mbox" / "carol@other.test.mbox").exists()
    with pytest.raises(ExportError, match="exists"):
        await export(spool, Selection(domain="example.test"), Format.MBOX, tmp_path / "mbox")


async def test_from_lines_are_quoted_mboxrd_even_across_chunks(spool: SqliteSpool, tmp_path: Path) -> None:
    text = "From the start\n>From already quoted\nFrom " + "x" * (1 << 20) + "\nFrom the end, no newline"
    raw = mail.plain(text=text)
    raw = raw.rstrip(b"\r\n")  # a body without a final newline
    qid = await put(spool, ["alice@example.test"], raw)
    stored = await spool.read_body(qid)
    await export(spool, Selection(recipient="alice@example.test"), Format.MBOX, tmp_path / "out")
    box = mailbox.mbox(tmp_path / "out" / "alice@example.test.mbox", create=False)
    (key,) = box.keys()
    got = box.get_bytes(key)
    assert b"\n>From the start" in got and b"\n>>From already quoted" in got and b"\n>From the end" in got
    assert b"\nFrom " not in got
    assert unquote_mboxrd(got).rstrip(b"\n") == stored.rstrip(b"\n")


async def test_maildir_and_eml_resume(spool: SqliteSpool, tmp_path: Path) -> None:
    ids = [await put(spool, ["alice@example.test"], mail.plain(subject=f"m{i}")) for i in range(3)]
    for fmt in (Format.MAILDIR, Format.EML):
        dest = tmp_path / fmt.value
        first = await export(spool, Selection(recipient="Alice@Example.test"), fmt, dest)
        assert first.copies == 3
        again = await export(spool, Selection(recipient="alice@example.test"), fmt, dest)
        assert (again.copies, again.skipped) == (0, 3)
    md = mailbox.Maildir(tmp_path / "maildir" / "alice@example.test", create=False)
    assert sorted(md.get_bytes(k) for k in md.iterkeys()) == sorted([await spool.read_body(q) for q in ids])
    assert not list((tmp_path / "maildir" / "alice@example.test" / "tmp").iterdir())
    emls = sorted((tmp_path / "eml" / "alice@example.test").glob("*.eml"))
    assert [p.stem for p in emls] == sorted(ids)
    assert emls[0].read_bytes() == await spool.read_body(sorted(ids)[0])


async def test_progress_and_selection(spool: SqliteSpool, tmp_path: Path) -> None:
    await put(spool, ["alice@example.test"], mail.plain())
    await put(spool, ["xalice@example.test"], mail.plain())  # not alice: the spool filter is a substring
    sel = Selection(recipient="alice@example.test")
    assert await count(spool, sel) == 1
    out = io.StringIO()
    res = await export(spool, sel, Format.EML, tmp_path / "e", progress=Progress(1, stream=out))
    assert res.messages == 1 and "exported 1 messages" in out.getvalue()
    with pytest.raises(ExportError):
        await export(spool, Selection(), Format.EML, tmp_path / "e")
