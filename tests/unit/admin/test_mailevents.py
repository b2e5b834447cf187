"""Reading the mail log: reason classes from replies, domains from recipients, bounded history."""

from __future__ import annotations

import pytest

from backupmx.admin.mailevents import MailEvent, MailTally, MessageHistory, ReasonClass, event_domains, reason_class
from backupmx.model import MessageKind

KNOWN = frozenset({"example.test", "other.test"})


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"reply": "554 5.7.1 Relay access denied"}, ReasonClass.POLICY),
        ({"reply": "550 5.1.1 <a@x>: unknown user"}, ReasonClass.ADDRESS),
        ({"dsn": "4.4.1", "reply": "451 4.4.1 connect refused"}, ReasonClass.NETWORK),
        ({"reply": "452 4.3.1 Insufficient system storage"}, ReasonClass.SYSTEM),
        ({"reply": "552 5.2.2 mailbox full"}, ReasonClass.MAILBOX),
        ({"reply": "554 5.6.7 SMTPUTF8 required"}, ReasonClass.CONTENT),
        ({"reply": "500 5.5.2 line too long"}, ReasonClass.PROTOCOL),
        ({"reply": "250 2.0.0 Ok"}, ReasonClass.OK),
        ({"reply": "421 too busy"}, ReasonClass.OTHER),
        ({"reason": "recovery-guard"}, ReasonClass.OTHER),  # text that is not a reply is not misread
        ({"status": "5.7.1"}, ReasonClass.POLICY),
        ({"status": "5.7"}, ReasonClass.OTHER),  # not a status code: two parts
        ({"status": "3.1.1"}, ReasonClass.OTHER),  # no such class
        ({"status": "5..1"}, ReasonClass.OTHER),
        ({"status": "5.1.1x"}, ReasonClass.OTHER),
        ({"reply": "250 5.x ok"}, ReasonClass.OK),  # a 2xx reply without a valid status code
        ({}, ReasonClass.OTHER),
    ],
)
def test_reason_class(fields: dict[str, object], expected: ReasonClass) -> None:
    assert reason_class(fields) is expected


def test_event_domains_label_only_protected_domains() -> None:
    assert event_domains({"to": "<a@example.test>,<b@Other.Test>,<c@evil.test>"}, KNOWN) == [
        "example.test",
        "other.test",
        "other",
    ]
    assert event_domains({"recipient": "<x@example.test.>"}, KNOWN) == ["example.test"]
    assert event_domains({"domain": "OTHER.test"}, KNOWN) == ["other.test"]
    assert event_domains({"to": ["a@example.test"]}, KNOWN) == ["example.test"]
    assert event_domains({"client": "192.0.2.1"}, KNOWN) == ["other"]


def test_tally_counts_per_recipient_and_ignores_other_events() -> None:
    t = MailTally(KNOWN)
    t.listener("queued", {"to": "<a@example.test>,<b@example.test>"})
    t.listener("connect", {"client": "192.0.2.1"})
    t.listener("delivered", {"to": "<a@example.test>", "reply": "250 2.0.0 Ok"})
    t.listener("deferred", {"to": "<b@example.test>", "reply": "451 4.4.1 refused"})
    assert t.counts() == {
        (MailEvent.ACCEPTED, "example.test", ReasonClass.OK): 2,
        (MailEvent.DELIVERED, "example.test", ReasonClass.OK): 1,
        (MailEvent.DEFERRED, "example.test", ReasonClass.NETWORK): 1,
    }
    assert t.totals(MailEvent.ACCEPTED) == {"example.test": 2}


def test_history_is_bounded() -> None:
    h = MessageHistory(max_messages=3, max_events=2)
    for i in range(5):
        for e in ("queued", "deferred", "delivered"):
            h.listener(e, {"queue_id": f"Q{i}", "to": "<a@example.test>"})
    assert h.of("Q0") == [] and h.of("Q1") == []
    assert [x.event for x in h.of("Q4")] == ["deferred", "delivered"]
    assert h.of("Q4")[0].fields == {"to": "<a@example.test>"}


def test_our_own_mail_never_counts_as_user_mail() -> None:
    """Canaries and DSNs (`kind=` in the mail log) are counted apart, by kind, never in the user-mail totals
    nor among the delivery failures."""
    t = MailTally(KNOWN)
    t.listener("queued", {"to": "<canary@example.test>", "kind": "canary"})
    t.listener("delivered", {"to": "<canary@example.test>", "reply": "250 2.0.0 Ok", "kind": "canary"})
    t.listener("bounced", {"to": "<canary@example.test>", "reply": "550 5.1.1 unknown", "kind": "canary"})
    t.listener("deferred", {"to": "<bob@sender.test>", "reply": "450 4.2.0 busy", "kind": "dsn"})
    t.listener("bounced", {"to": "<bob@example.test>", "reply": "550 5.1.1 unknown", "kind": "dsn"})
    t.listener("delivered", {"to": "<bob@example.test>", "reply": "250 2.0.0 Ok", "kind": "mystery"})
    assert t.counts() == {}
    assert t.totals(MailEvent.ACCEPTED) == {} and t.totals(MailEvent.DELIVERED) == {}
    assert t.failures_since("example.test", 0.0) == 0
    assert t.own_counts() == {
        (MessageKind.CANARY, MailEvent.ACCEPTED, ReasonClass.OK): 1,
        (MessageKind.CANARY, MailEvent.DELIVERED, ReasonClass.OK): 1,
        (MessageKind.CANARY, MailEvent.BOUNCED, ReasonClass.ADDRESS): 1,
        (MessageKind.DSN, MailEvent.DEFERRED, ReasonClass.MAILBOX): 1,
        (MessageKind.DSN, MailEvent.BOUNCED, ReasonClass.ADDRESS): 1,
    }
    t.listener("bounced", {"to": "<a@example.test>", "reply": "550 5.1.1 unknown", "kind": "user"})
    t.listener("delivered", {"to": "<a@example.test>", "reply": "250 2.0.0 Ok"})
    assert t.counts() == {
        (MailEvent.BOUNCED, "example.test", ReasonClass.ADDRESS): 1,
        (MailEvent.DELIVERED, "example.test", ReasonClass.OK): 1,
    }
