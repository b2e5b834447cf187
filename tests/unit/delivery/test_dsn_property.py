"""Property (issue 12 item 2): for any envelope the SMTP parser accepts and any reply text, `build_dsn`
succeeds, and Python's `email` parser reads back a message whose headers and DSN fields are only the
ones a DSN has: nothing the envelope or the reply carried adds or breaks a line."""

from __future__ import annotations

import re
from email import policy
from email.message import Message
from email.parser import BytesParser

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupmx.delivery.bounce import DsnAction, DsnRecipient, build_dsn
from backupmx.model import Envelope, MessageRecord, QueueId, RecipientRecord, RecipientState
from backupmx.reply import Reply
from tests.unit.smtp.harness import Harness

# mostly what the parser accepts (dot-atoms, quoted strings with specials, UTF-8), sometimes what breaks
# lines (CR, LF, NUL, C1, U+2028, xtext and unitext escapes of them)
NASTY = ["\r", "\n", "\x00", "\x0b", "\x85", "\u2028"]
ATOM = st.text(alphabet=st.sampled_from("abcxyz09!#$%&'*+-/=?^_`{|}~\u00e9\u4e2d"), min_size=1, max_size=6)
DOT_ATOM = st.lists(ATOM, min_size=1, max_size=3).map(".".join)
QUOTED = st.lists(
    st.sampled_from(["a", " ", '\\"', "\\\\", "(", ")", "<", ">", "@", ",", ";", ":", "[", "=", "+", "\u00fc", *NASTY]),
    min_size=1,
    max_size=10,
).map(lambda p: f'"{"".join(p)}"')
LOCAL = st.one_of(DOT_ATOM, QUOTED)
DOMAIN = st.sampled_from(["sender.test", "B\u00fccher.test", "[127.0.0.1]", "x-y.test"])
GOOD_XTEXT = st.sampled_from(["a", "Z", "9", "-", ":", "+2B", "+20", "\\x{E9}", "\u00e9"])
BAD_XTEXT = st.sampled_from(["+0D", "+0A", "+00", "+7F", "+C3+A9", "\\x{D}", "\\x{2028}", *NASTY])
XTEXT = st.lists(st.one_of(GOOD_XTEXT, GOOD_XTEXT, GOOD_XTEXT, BAD_XTEXT), max_size=6).map("".join)
FIELDS = {
    "Reporting-MTA",
    "X-Backupmx-Queue-ID",
    "Original-Envelope-Id",
    "Arrival-Date",
    "Final-Recipient",
    "Original-Recipient",
    "Action",
    "Status",
    "Remote-MTA",
    "Diagnostic-Code",
    "Last-Attempt-Date",
    "Will-Retry-Until",
}
TOP = {"From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "MIME-Version", "Content-Type"}


@st.composite
def smtp_session(draw: st.DrawFn) -> bytes:
    utf8 = draw(st.booleans())
    sender = draw(st.builds(lambda a, b: f"{a}@{b}", LOCAL, DOMAIN))
    mail = f"MAIL FROM:<{sender}>" + (" SMTPUTF8" if utf8 else "")
    if draw(st.booleans()):
        mail += " ENVID=" + draw(XTEXT)
    if draw(st.booleans()):
        mail += " RET=" + draw(st.sampled_from(["FULL", "HDRS"]))
    lines = [mail]
    for _ in range(draw(st.integers(1, 3))):
        rcpt = f"RCPT TO:<{draw(LOCAL)}@example.test>"
        if draw(st.booleans()):
            rcpt += " NOTIFY=" + draw(st.sampled_from(["SUCCESS", "FAILURE,DELAY", "NEVER"]))
        if draw(st.booleans()):
            rcpt += f" ORCPT={draw(st.sampled_from(['rfc822', 'utf-8']))};{draw(XTEXT)}@x"
        lines.append(rcpt)
    return ("\r\n".join(lines) + "\r\nDATA\r\n").encode("utf-8") + b"Subject: s\r\n\r\nbody\r\n.\r\n"


def accepted_envelope(session: bytes) -> Envelope | None:
    h = Harness()
    h.ehlo()
    h.feed(session)
    if not h.stored:
        return None
    tx = h.stored[0].transaction
    return Envelope(
        sender=tx.sender,
        recipients=tuple(tx.recipients),
        smtputf8=tx.params.smtputf8,
        ret=tx.params.ret,
        envid=tx.params.envid,
    )


def fields(part: Message) -> set[str]:
    names: set[str] = set()
    payload = part.get_payload()
    if isinstance(payload, list):  # message/delivery-status: one Message per block
        for block in payload:
            names |= set(block.keys())
    else:  # message/global-delivery-status: the blocks as text
        for line in str(payload).split("\r\n"):
            if line and not line[0].isspace():
                names.add(line.partition(":")[0])
    return names


# any text, and any bytes as aiosmtplib hands them over (undecodable ones as lone surrogates)
REPLY_TEXT = st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: b.decode("utf-8", "surrogateescape")))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    session=smtp_session(),
    reply_text=REPLY_TEXT,
    code=st.sampled_from([250, 451, 550, 554]),
    action=st.sampled_from(list(DsnAction)),
)
def test_any_accepted_envelope_builds_a_clean_dsn(
    session: bytes, reply_text: str, code: int, action: DsnAction
) -> None:
    env = accepted_envelope(session)
    if env is None or not env.sender:
        return  # refused at the command, or <> (never gets a DSN): nothing to build
    qid = QueueId("0PROP")
    recs = tuple(
        RecipientRecord(qid, i, r.address, "example.test", RecipientState.QUEUED, notify=r.notify, orcpt=r.orcpt)
        for i, r in enumerate(env.recipients)
    )
    msg = MessageRecord(qid, env, 30, 1_700_000_000.0, recs)
    reply = Reply(code, "5.0.0", reply_text)
    dsn = build_dsn(
        msg,
        [DsnRecipient(r, action, "5.0.0", reply, "mx\r\nX-Evil: 1.test", 1_700_000_060.0) for r in recs],
        original=b"Subject: s\r\n\r\nbody\r\n",
        reporting_mta="backup.test",
        now=1_700_000_100.0,
    )
    assert re.search(rb"(?<!\r)\n|\r(?!\n)", dsn.body) is None
    top = BytesParser(policy=policy.default).parsebytes(dsn.body)
    assert set(top.keys()) <= TOP, top.keys()
    assert not top.defects, top.defects
    assert top.get_content_type() == "multipart/report"
    parts = top.get_payload()
    assert isinstance(parts, list) and len(parts) == 3
    assert fields(parts[1]) <= FIELDS
    assert b"\r\nX-Evil" not in dsn.body  # the Remote-MTA's CR/LF became spaces, on the same line
