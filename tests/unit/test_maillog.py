"""The mail log's text format read back by an independent parser (below): hostile values (CR, LF, ESC,
quotes, `>, status=sent, relay=<`, C1 controls, bidi overrides, line separators) come back exactly,
never add a field or a line; Hypothesis tries arbitrary text. And the best-effort writer: a full
disk (/dev/full) or a closed stream never raises, is counted per log, and the next good write works."""

from __future__ import annotations

import io
import json
import logging
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupmx.logfailures import LogName, WriteFailures
from backupmx.maillog import AddressList, MailLog, format_text
from tests.support.maillog_text import ParseError, parse

HOSTILE = [
    "evil\rFAKE\x1b[31m",
    '"x>, status=sent, relay=<fake"@evil.test',
    '<"x>, status=sent, relay=<fake"@evil.test>',
    "a\r\n2026-01-01T00:00:00.000Z mx backupmx/delivered: Q1: to=<victim@x.test>, status=sent",
    "csi\x9b31m and del\x7f and nel\x85",
    "bidi \u202etxt.exe and ls\u2028ps\u2029",
    "back\\slash, comma=equals",
    "",
    "<>",
    "<",
    ">",
    "<a>,<b>",
    "ünïcødé@例え.テスト",
    "astral \U0001f600 and lone \udcff surrogate",
]


def roundtrip(fields: dict[str, object], qid: str | None = None) -> tuple[str, dict[str, str]]:
    line = format_text(1_700_000_000.5, "backup.test", "reject", {**({"queue_id": qid} if qid else {}), **fields})
    node, event, got_qid, got = parse(line)
    assert (node, event, got_qid) == ("backup.test", "reject", qid)
    return line, got


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_hostile_values_read_back_exactly(value: str) -> None:
    fields: dict[str, object] = {
        "helo": value,
        "sender": f"<{value}>",
        "command": value,
        "to": AddressList([value, "ok@ours.test", value]),
    }
    line, got = roundtrip(fields, qid="4Xb9Zq0AB12")
    assert got == {k: str(v) for k, v in fields.items()}
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\x9b" not in line
    assert all(c not in line for c in "\x85\u2028\u2029\u202e\x7f")
    assert len(line.splitlines()) == 1


def test_the_issue_examples_as_written() -> None:
    line, got = roundtrip({"helo": "evil\rFAKE\x1b[31m", "sender": '<"x>, status=sent, relay=<fake"@evil.test>'})
    assert line.endswith(r'helo="evil\rFAKE\u001b[31m", sender=<"\"x>, status=sent, relay=<fake\"@evil.test">')
    assert set(got) == {"helo", "sender"}


def test_ordinary_lines_stay_as_operators_know_them() -> None:
    line = format_text(
        0.0,
        "backup.test",
        "queued",
        {
            "queue_id": "4Xb9Zq0AB12",
            "client": "127.0.0.1",
            "helo": "client.test",
            "size": 123,
            "to": AddressList(["a@ours.test", "b@ours.test"]),
            "from": "<>",
            "reply": "250 2.0.0 Ok",
        },
    )
    assert line == (
        "1970-01-01T00:00:00.000Z backup.test backupmx/queued: 4Xb9Zq0AB12: client=127.0.0.1, "
        'helo=client.test, size=123, to=<a@ours.test>,<b@ours.test>, from=<>, reply="250 2.0.0 Ok"'
    )


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["helo", "sender", "command", "reply", "reason", "x"]), st.text(max_size=40), min_size=1
    ),
    st.lists(st.text(max_size=20), max_size=3),
    st.one_of(st.none(), st.text(min_size=1, max_size=12)),
)
def test_any_text_reads_back_exactly(values: dict[str, str], addresses: list[str], qid: str | None) -> None:
    fields: dict[str, object] = dict(values)
    if "sender" in fields:
        fields["sender"] = f"<{fields['sender']}>"
    fields["to"] = AddressList(addresses)
    line, got = roundtrip(fields, qid=qid)
    assert got == {k: str(v) for k, v in fields.items()}
    assert len(line.splitlines()) == 1 and line.isprintable()


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_json_lines_stay_one_line(value: str) -> None:
    out = io.StringIO()
    MailLog(out, fmt="json", node="n").event("reject", helo=value, to=AddressList([value]))
    text = out.getvalue()
    assert text.endswith("\n") and len(text.splitlines()) == 1 and text[:-1].isprintable()
    doc = json.loads(text)
    assert doc["helo"] == value and doc["to"] == f"<{value}>"


# -- best effort -------------------------------------------------------------------------------------
def test_full_disk_never_raises_is_counted_and_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = [0.0]
    failures = WriteFailures(report_every=60.0, clock=lambda: clock[0])
    full = open("/dev/full", "w")  # noqa: SIM115 (ENOSPC on every flush)
    log = MailLog(full, failures=failures)
    caplog.set_level(logging.WARNING, "backupmx.logs")
    for _ in range(5):
        log.event("connect", client="127.0.0.1")
    assert failures.counts()[LogName.MAILLOG] == 5
    reports = [r for r in caplog.records if "write(s) failed" in r.getMessage()]
    assert len(reports) == 1 and "No space left on device" in reports[0].getMessage()
    clock[0] = 61.0
    log.event("connect", client="127.0.0.1")
    reports = [r for r in caplog.records if "write(s) failed" in r.getMessage()]
    assert len(reports) == 2 and "5 write(s) failed" in reports[1].getMessage()  # the 5 since the last report


def test_a_closed_stream_never_raises_and_recovery_is_said(caplog: pytest.LogCaptureFixture) -> None:
    failures = WriteFailures()
    out = io.StringIO()
    log = MailLog(out, failures=failures)
    caplog.set_level(logging.WARNING, "backupmx.logs")
    good = io.StringIO()
    out.close()
    log.event("queued", "Q1", to=AddressList(["a@b.test"]))
    assert failures.counts()[LogName.MAILLOG] == 1
    log._sink.stream = good  # type: ignore[attr-defined]  # the stream works again
    log.event("queued", "Q2", to=AddressList(["a@b.test"]))
    assert "backupmx/queued: Q2: to=<a@b.test>" in good.getvalue()
    assert any("writing again (1 write(s) lost)" in r.getMessage() for r in caplog.records)


def test_a_line_torn_by_a_full_disk_is_ended_before_the_next(tmp_path: Path) -> None:
    """A real partial write: an 8 KiB tmpfs (root only), one page for a filler, one for the mail log."""
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(disk)], capture_output=True, timeout=30)
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (disk / "filler").write_bytes(b"f" * 4096)
        failures = WriteFailures()
        path = disk / "mail.log"
        log = MailLog.to_path(path, node="n")
        log._failures = failures
        for _ in range(40):  # bounded: 40 lines of ~370 bytes overflow the log's 4 KiB page
            log.event("connect", client="x" * 300)
        assert failures.counts()[LogName.MAILLOG] >= 2  # the torn one, and whole ones after it
        data = path.read_bytes()
        assert len(data) == 4096 and not data.endswith(b"\n")  # the last line was cut short
        (disk / "filler").unlink()  # room again
        log.event("connect", client="127.0.0.1")
        lines = path.read_text().split("\n")
        assert lines[-1] == "" and parse(lines[-2])[3] == {"client": "127.0.0.1"}  # whole, on its own line
        try:  # the torn one: ended on its own line, never merged with the next (its value may just be short)
            assert parse(lines[-3])[3] != {"client": "x" * 300}
        except ParseError:
            pass
        assert all(parse(ln)[3] == {"client": "x" * 300} for ln in lines[:-3])
        log.close()
        assert (path.stat().st_mode & 0o777) == 0o600
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)
