"""Value types: queue IDs sort by arrival and never repeat; envelopes round-trip; replies format safely."""

from __future__ import annotations

from backupmx.model import Envelope, MessageKind, Recipient, new_queue_id
from backupmx.reply import Reply


def test_queue_ids_unique_sortable_short() -> None:
    ids = [new_queue_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 14 and i.isalnum() and i.isupper() for i in ids)
    assert new_queue_id(now=1_000_000_000.0) < new_queue_id(now=1_000_000_001.0)


def test_envelope_round_trip() -> None:
    env = Envelope(
        sender="",
        recipients=(
            Recipient("Alice@example.test", ("SUCCESS", "FAILURE"), "rfc822;a@b"),
            Recipient("bob@example.test"),
        ),
        body_type="8BITMIME",
        smtputf8=True,
        ret="HDRS",
        envid="abc",
        client_ip="127.0.0.1",
        client_helo="c.test",
        kind=MessageKind.DSN,
    )
    assert Envelope.from_json(env.to_json()) == env
    assert env.recipients[0].domain == "example.test"


def test_reply_formatting_never_passes_crlf() -> None:
    r = Reply(250, "2.0.0", "Ok\r\nX-Injected: yes")
    wire = r.to_bytes()
    assert wire == b"250-2.0.0 Ok\r\n250 2.0.0 X-Injected: yes\r\n"
    assert Reply(220, "", "host ESMTP").to_bytes() == b"220 host ESMTP\r\n"
    assert Reply.parse(str(Reply(550, "5.1.1", "user unknown"))) == Reply(550, "5.1.1", "user unknown")
