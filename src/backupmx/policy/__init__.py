"""Policy: ordered checks asked at each step of an SMTP session, each returning a Verdict.

A check never raises for ordinary input; an unexpected error inside a check is logged and answered
as a temporary failure (451 4.3.0), never as a rejection: for a backup MX an unknown error means
"try again", never "bounce". Client-facing texts never reveal configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from backupmx.reply import Reply


def domain_of(address: str) -> str:
    """The domain of `local@domain` ("" when there is none); `@` inside a quoted local part is skipped
    because the domain is what follows the last `@`, and a domain never contains one."""
    local, at, domain = address.rpartition("@")
    return domain.lower() if at and local else ""


class Stage(StrEnum):
    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # before 354
    EOM = "eom"  # after the final dot, before the commit


class Action(StrEnum):
    CONTINUE = "continue"  # no opinion; ask the next check
    ACCEPT = "accept"  # stop asking; accept
    DEFER = "defer"  # temporary refusal (4xx)
    REJECT = "reject"  # permanent refusal (5xx)


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reply: Reply | None = None
    log_reason: str = ""  # for the mail log only (may name a DNSBL zone, a file...); never sent

    @classmethod
    def cont(cls) -> Verdict:
        return _CONTINUE

    @classmethod
    def accept(cls) -> Verdict:
        return _ACCEPT

    @classmethod
    def defer(cls, reply: Reply, log_reason: str = "") -> Verdict:
        return cls(Action.DEFER, reply, log_reason)

    @classmethod
    def reject(cls, reply: Reply, log_reason: str = "") -> Verdict:
        return cls(Action.REJECT, reply, log_reason)

    @property
    def refuses(self) -> bool:
        return self.action in (Action.DEFER, Action.REJECT)


_CONTINUE = Verdict(Action.CONTINUE)
_ACCEPT = Verdict(Action.ACCEPT)


@dataclass(slots=True)
class SessionInfo:
    """What checks may read about the session so far."""

    client_ip: str
    client_port: int = 0
    helo: str = ""
    tls: bool = False
    tls_version: str = ""  # "TLSv1.3" after STARTTLS (for content filters)
    tls_cipher: str = ""  # "TLS_AES_256_GCM_SHA384"
    sender: str | None = None  # "" for <>; None before MAIL
    smtputf8: bool = False  # MAIL FROM parameters of the transaction (policy/mirror.py)
    body_type: str | None = None  # "7BIT" | "8BITMIME"
    size: int | None = None  # SIZE=
    recipients: list[str] = field(default_factory=list)  # accepted so far in this transaction


class Check(Protocol):
    """One rule. `stage` says when it runs; `address` is the recipient at RCPT, the sender at MAIL."""

    name: str
    stages: frozenset[Stage]

    async def check(self, stage: Stage, session: SessionInfo, address: str | None) -> Verdict: ...


class HeaderFilter(Protocol):
    """Rewrites the incoming message while it streams in (in practice: fields of its header section).
    `feed` returns what may be stored now; `finish`, at the end of DATA, whatever it still holds."""

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Stamp:
    """What a HeaderStamp adds to one message: whole header fields (each ending in CRLF) written at the
    top, above our Received header, and an optional filter over the incoming message."""

    headers: bytes = b""
    filter: HeaderFilter | None = None


class HeaderStamp(Protocol):
    """Asked once per message when DATA is accepted (before 354), with the envelope known; the fields
    it returns are prepended to the stored message (the Authentication-Results of SPF, spf.py). A stamp
    that raises is logged and skipped: it never costs a message."""

    name: str

    async def stamp(self, session: SessionInfo) -> Stamp: ...


async def run_checks(
    checks: Sequence[Check], stage: Stage, session: SessionInfo, address: str | None = None
) -> Verdict:
    """Ask each check for `stage` in order; the first verdict other than CONTINUE wins."""
    for chk in checks:
        if stage not in chk.stages:
            continue
        verdict = await chk.check(stage, session, address)
        if verdict.action is not Action.CONTINUE:
            return verdict
    return Verdict.accept()
