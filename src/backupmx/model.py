"""Core value types of the mail's path: envelopes, recipients and their states, queue IDs,
delivery outcomes. Frozen dataclasses and enums; this module imports nothing of ours but reply and clock."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NewType

from backupmx.clock import iso_time
from backupmx.reply import Reply

QueueId = NewType("QueueId", str)


class RecipientState(StrEnum):
    QUEUED = "queued"  # waiting for (another) attempt; attempts > 0 means deferred
    DELIVERED = "delivered"  # the primary said 250
    BOUNCED = "bounced"  # permanent failure; a DSN was queued in the same commit (unless none owed)
    EXPIRED = "expired"  # retention ran out; a DSN was queued in the same commit (unless none owed)
    HELD = "held"  # set aside by the operator or the recovery guard; no attempts until released

    @property
    def is_final(self) -> bool:
        return self in (RecipientState.DELIVERED, RecipientState.BOUNCED, RecipientState.EXPIRED)


class MessageKind(StrEnum):
    USER = "user"  # mail accepted over SMTP for a protected domain
    DSN = "dsn"  # a delivery status notification we generated (sender is <>)
    CANARY = "canary"  # a probe message through our own path; never counted as user mail


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str  # local part as given, domain lower-cased; never empty
    notify: tuple[str, ...] | None = None  # RFC 3461 NOTIFY: ("NEVER",) or subset of SUCCESS/FAILURE/DELAY
    orcpt: str | None = None  # RFC 3461 ORCPT, kept raw: "rfc822;alice@example.com"

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


@dataclass(frozen=True, slots=True)
class Envelope:
    sender: str  # "" is the null reverse path <>
    recipients: tuple[Recipient, ...]
    body_type: str | None = None  # MAIL BODY=: "7BIT" | "8BITMIME" | None
    smtputf8: bool = False
    ret: str | None = None  # RFC 3461 RET=FULL|HDRS
    envid: str | None = None  # RFC 3461 ENVID (xtext, kept raw)
    client_ip: str = ""
    client_helo: str = ""
    kind: MessageKind = MessageKind.USER

    def to_json(self) -> dict[str, object]:
        return {
            "sender": self.sender,
            "recipients": [
                {"address": r.address, "notify": list(r.notify) if r.notify else None, "orcpt": r.orcpt}
                for r in self.recipients
            ],
            "body_type": self.body_type,
            "smtputf8": self.smtputf8,
            "ret": self.ret,
            "envid": self.envid,
            "client_ip": self.client_ip,
            "client_helo": self.client_helo,
            "kind": self.kind.value,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Envelope:
        """Raises KeyError/TypeError/ValueError on a damaged record (the spool sets such entries aside)."""
        rcpts_raw = data["recipients"]
        if not isinstance(rcpts_raw, list):
            raise TypeError("recipients")
        rcpts = tuple(
            Recipient(
                address=str(r["address"]),
                notify=tuple(r["notify"]) if r.get("notify") else None,
                orcpt=r.get("orcpt"),
            )
            for r in rcpts_raw
        )
        return cls(
            sender=str(data["sender"]),
            recipients=rcpts,
            body_type=_opt_str(data.get("body_type")),
            smtputf8=bool(data.get("smtputf8", False)),
            ret=_opt_str(data.get("ret")),
            envid=_opt_str(data.get("envid")),
            client_ip=str(data.get("client_ip", "")),
            client_helo=str(data.get("client_helo", "")),
            kind=MessageKind(str(data.get("kind", "user"))),
        )


def _opt_str(v: object) -> str | None:
    return None if v is None else str(v)


# --- queue IDs -------------------------------------------------------------------------------------
# 14 characters of Crockford base32: 55 bits of microseconds since the epoch, then 15 bits of a
# per-process counter (randomly seeded, mixed with the pid). Fixed width, so lexical order is arrival
# order; the microsecond clock is forced monotonic within a process, and the low bits keep IDs from
# different processes or nodes apart.
_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_id_lock = threading.Lock()
_id_state = {"last": 0, "seq": int.from_bytes(os.urandom(2), "big")}


def new_queue_id(now: float | None = None) -> QueueId:
    us = int((time.time() if now is None else now) * 1_000_000)
    with _id_lock:
        if us <= _id_state["last"]:
            us = _id_state["last"] + 1
        _id_state["last"] = us
        _id_state["seq"] = (_id_state["seq"] + 1) & 0x7FFF
        seq = _id_state["seq"] ^ (os.getpid() & 0x7FFF)
    value = ((us & ((1 << 55) - 1)) << 15) | seq  # 70 bits -> 14 chars
    chars = []
    for _ in range(14):
        chars.append(_B32[value & 31])
        value >>= 5
    return QueueId("".join(reversed(chars)))


# --- spool records (what list/show/claim return) ---------------------------------------------------
@dataclass(frozen=True, slots=True)
class RecipientRecord:
    message_id: QueueId
    index: int  # position in the envelope
    address: str
    domain: str
    state: RecipientState
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_attempt_at: float | None = None
    last_reply: str | None = None  # str(Reply) of the last answer (ours or the primary's)
    held_reason: str | None = None  # "operator" | "recovery-guard" | "drill" ... when HELD
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    delay_notified: bool = False  # a delay DSN was sent for this recipient (at most one per message)
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class MessageRecord:
    id: QueueId
    envelope: Envelope
    size: int  # stored body bytes, Received header included
    received_at: float
    recipients: tuple[RecipientRecord, ...] = field(default_factory=tuple)

    @property
    def kind(self) -> MessageKind:
        return self.envelope.kind

    @property
    def pending(self) -> bool:
        return any(not r.state.is_final for r in self.recipients)

    def to_json(self, *, with_domains: bool = False) -> dict[str, Any]:
        """The message as `backupmx queue list --json` shows it; the admin API adds each recipient's domain."""
        recipients: list[dict[str, Any]] = []
        for r in self.recipients:
            doc: dict[str, Any] = {"address": r.address}
            if with_domains:
                doc["domain"] = r.domain
            doc.update(
                {
                    "state": r.state.value,
                    "attempts": r.attempts,
                    "next_attempt_at": iso_time(r.next_attempt_at) if r.state is RecipientState.QUEUED else None,
                    "last_attempt_at": iso_time(r.last_attempt_at),
                    "last_reply": r.last_reply,
                    "held_reason": r.held_reason,
                    "held_since": iso_time(r.updated_at) if r.state is RecipientState.HELD else None,
                }
            )
            recipients.append(doc)
        return {
            "id": self.id,
            "size": self.size,
            "received_at": iso_time(self.received_at),
            "sender": self.envelope.sender,
            "kind": self.kind.value,
            "client_ip": self.envelope.client_ip,
            "recipients": recipients,
        }


# --- delivery outcomes -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Delivered:
    reply: Reply


@dataclass(frozen=True, slots=True)
class Deferred:
    reply: Reply
    # True when the deferral is the recovery guard turning a 5xx into a hold for review
    guard_hold: bool = False


@dataclass(frozen=True, slots=True)
class Bounced:
    reply: Reply


Outcome = Delivered | Deferred | Bounced
