"""What the admin side hears from the mail log (`MailLog.subscribe`): event counters by kind, protected
domain and reason class (for /metrics, the rate charts and the delivery-failure alert), and a bounded
memory of recent events per queue ID (the per-recipient history on a message's page).

Only user mail counts as mail here. Events of mail we make ourselves carry `kind=` in the mail log (the
listener's `queued`, the engine's `delivered`/`deferred`/...): canaries and DSNs are counted apart
(`MailTally.own_counts`, by kind), so they never show in the user-mail totals, the rate charts or the
delivery-failure alert. A DSN to a sender is our mail, not mail we hold for a protected domain; its
delivery still matters (a refused DSN is a sender we could not tell), hence its own counter.

Listeners run in the thread that logs, so both classes take a lock and do constant work per event.
Labels come from enums and configured domain names only, never from addresses or IPs.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from backupmx.model import MessageKind
from backupmx.reply import Reply

OTHER_DOMAIN = "other"  # label for mail to or from a domain we do not protect (DSNs, relay attempts)


class MailEvent(StrEnum):
    ACCEPTED = "accepted"  # a recipient of a message we took responsibility for (250 after DATA)
    REJECTED = "rejected"  # refused during the SMTP session (4xx or 5xx, before any 250 for DATA)
    DEFERRED = "deferred"  # a delivery attempt failed temporarily
    DELIVERED = "delivered"  # the primary (or a reroute target) said 250
    BOUNCED = "bounced"  # failed permanently; a DSN was queued
    EXPIRED = "expired"  # retention ran out; a DSN was queued
    HELD = "held"  # set aside by the recovery guard or an operator


# mail log event name -> what it counts as; events not listed (connect, released, ...) are not counted
EVENT_KINDS: Mapping[str, MailEvent] = {
    "queued": MailEvent.ACCEPTED,  # smtp/server.py: after the commit, with to=<a>,<b> and nrcpt
    "reject": MailEvent.REJECTED,
    "rejected": MailEvent.REJECTED,
    "deferred": MailEvent.DEFERRED,
    "delivered": MailEvent.DELIVERED,
    "bounced": MailEvent.BOUNCED,
    "expired": MailEvent.EXPIRED,
    "held": MailEvent.HELD,
}


class ReasonClass(StrEnum):
    """The subject of an RFC 3463 enhanced status code (X.<subject>.Z), in words."""

    OK = "ok"  # 2.X.X
    OTHER = "other"  # X.0.X, or no status code at all
    ADDRESS = "address"  # X.1.X: bad destination or sender address
    MAILBOX = "mailbox"  # X.2.X: mailbox full, disabled ...
    SYSTEM = "system"  # X.3.X: the receiving system (disk full, not accepting ...)
    NETWORK = "network"  # X.4.X: connection refused, timeout, routing: the primary is unreachable
    PROTOCOL = "protocol"  # X.5.X
    CONTENT = "content"  # X.6.X: media, conversion, SMTPUTF8
    POLICY = "policy"  # X.7.X: relay denied, DNSBL, spam filter, rate limits


_SUBJECTS = {
    "0": ReasonClass.OTHER,
    "1": ReasonClass.ADDRESS,
    "2": ReasonClass.MAILBOX,
    "3": ReasonClass.SYSTEM,
    "4": ReasonClass.NETWORK,
    "5": ReasonClass.PROTOCOL,
    "6": ReasonClass.CONTENT,
    "7": ReasonClass.POLICY,
}
_REPLY_FIELDS = ("reply", "status", "dsn", "response", "reason")
_ADDRESS_FIELDS = ("to", "rcpt", "recipient", "recipients", "orig_to")


def reason_class(fields: Mapping[str, object]) -> ReasonClass:
    """The reason class of an event, from its enhanced status code ("5.7.1", or a reply "550 5.1.1 ...")."""
    for key in _REPLY_FIELDS:
        value = fields.get(key)
        if value is None:
            continue
        text = str(value).strip()
        if _is_status(text):
            status = text
        elif text[:3].isdigit() and text[:1] in "245":  # a reply: "550 5.1.1 <x@y>: unknown user"
            status = Reply.parse(text).status
            if not _is_status(status):
                return ReasonClass.OK if text[0] == "2" else ReasonClass.OTHER
        else:
            continue
        return ReasonClass.OK if status[0] == "2" else _SUBJECTS.get(status.split(".")[1], ReasonClass.OTHER)
    return ReasonClass.OTHER


# one regex instead of split + isdigit per part: it runs for every delivered/deferred line (profiled
# at ~2 % of the delivery path's Python time in bench/profile.py)
_STATUS = re.compile(r"[245]\d*\.\d+\.\d+")


def _is_status(text: str) -> bool:
    return _STATUS.fullmatch(text) is not None


def event_domains(fields: Mapping[str, object], known: frozenset[str]) -> list[str]:
    """The protected domains an event concerns, one entry per recipient (OTHER_DOMAIN for the rest).

    Reads a `domain` field first, then recipient fields (`to`, `rcpt`, ...; a string, a comma list or a
    list). An event with no recipient at all counts once, as OTHER_DOMAIN."""
    domain = fields.get("domain")
    if isinstance(domain, str) and domain:
        return [domain.lower() if domain.lower() in known else OTHER_DOMAIN]
    out: list[str] = []
    for key in _ADDRESS_FIELDS:
        value = fields.get(key)
        if value is None:
            continue
        for address in _addresses(value):
            d = address.rpartition("@")[2].strip("<> ").rstrip(".").lower()
            out.append(d if d in known else OTHER_DOMAIN)
        if out:
            return out
    return [OTHER_DOMAIN]


def _addresses(value: object) -> Iterable[str]:
    if isinstance(value, str):
        return [a for a in (p.strip() for p in value.split(",")) if a]
    if isinstance(value, list | tuple | set | frozenset):
        return [str(a) for a in value]
    return [str(value)]


CounterKey = tuple[MailEvent, str, ReasonClass]  # (event, domain label, reason class)
OwnKey = tuple[MessageKind, MailEvent, ReasonClass]  # (kind of our own mail, event, reason class)


def message_kind(fields: Mapping[str, object]) -> MessageKind | None:
    """The kind of mail an event is about: USER when it has no `kind` field, None for a kind we do not know."""
    value = fields.get("kind")
    if value is None or value == "":
        return MessageKind.USER
    try:
        return MessageKind(str(value))
    except ValueError:
        return None


class MailTally:
    """Cumulative counts of user-mail events since start, keyed by (event, domain, reason class), and
    apart from them, of our own mail's (DSNs, canaries) by (kind, event, reason class).

    Read by the Prometheus collector (as counters) and by the time series sampler (as deltas)."""

    def __init__(self, domains: Iterable[str]) -> None:
        self._known = frozenset(d.lower() for d in domains)
        self._lock = threading.Lock()
        self._counts: dict[CounterKey, int] = {}
        self._own: dict[OwnKey, int] = {}
        # the last failure and the last success per domain, for the delivery-failure alert
        self._failures: dict[str, list[tuple[float, ReasonClass]]] = {}
        self._last_success: dict[str, float] = {}

    @property
    def domains(self) -> frozenset[str]:
        return self._known

    def listener(self, event: str, fields: dict[str, object]) -> None:
        kind = EVENT_KINDS.get(event)
        if kind is None or "via" in fields:  # an operator's action (admin audit line), not mail flow
            return
        # an accepted message is OK whatever its fields say: no need to look for a status code
        reason = ReasonClass.OK if kind is MailEvent.ACCEPTED else reason_class(fields)
        mail = message_kind(fields)
        if mail is not MessageKind.USER:
            if mail is not None:
                own: OwnKey = (mail, kind, reason)
                with self._lock:
                    self._own[own] = self._own.get(own, 0) + 1
            return
        domains = event_domains(fields, self._known)
        now = time.time()
        with self._lock:
            for d in domains:
                key = (kind, d, reason)
                self._counts[key] = self._counts.get(key, 0) + 1
                if kind is MailEvent.DELIVERED:
                    self._last_success[d] = now
                elif kind in (MailEvent.DEFERRED, MailEvent.BOUNCED) or (
                    kind is MailEvent.HELD and reason is not ReasonClass.OTHER
                ):
                    bucket = self._failures.setdefault(d, [])
                    bucket.append((now, reason))
                    if len(bucket) > 1000:  # bounded: only recent failures matter
                        del bucket[: len(bucket) - 1000]

    def counts(self) -> dict[CounterKey, int]:
        with self._lock:
            return dict(self._counts)

    def own_counts(self) -> dict[OwnKey, int]:
        """Events of our own mail (DSNs, canaries), kept out of `counts()`."""
        with self._lock:
            return dict(self._own)

    def totals(self, event: MailEvent) -> dict[str, int]:
        """Per domain label, all reasons summed."""
        out: dict[str, int] = {}
        for (kind, d, _), n in self.counts().items():
            if kind is event:
                out[d] = out.get(d, 0) + n
        return out

    def failures_since(self, domain: str, since: float, *, exclude: frozenset[ReasonClass] = frozenset()) -> int:
        """Delivery failures (deferred, bounced, held by the guard) of `domain` after `since`, leaving out
        the reason classes in `exclude`, and only those later than the last successful delivery."""
        with self._lock:
            last_ok = self._last_success.get(domain, 0.0)
            return sum(1 for t, r in self._failures.get(domain, ()) if t >= since and t > last_ok and r not in exclude)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    at: float
    event: str
    fields: dict[str, str]


class MessageHistory:
    """The recent mail log events of each queue ID, bounded in IDs and in events per ID."""

    def __init__(self, max_messages: int = 5000, max_events: int = 50) -> None:
        self._max_messages = max_messages
        self._max_events = max_events
        self._lock = threading.Lock()
        self._by_id: OrderedDict[str, list[HistoryEntry]] = OrderedDict()

    def listener(self, event: str, fields: dict[str, object]) -> None:
        qid = fields.get("queue_id")
        if not isinstance(qid, str) or not qid:
            return
        entry = HistoryEntry(time.time(), event, {k: str(v)[:500] for k, v in fields.items() if k != "queue_id"})
        with self._lock:
            events = self._by_id.get(qid)
            if events is None:
                events = self._by_id[qid] = []
                while len(self._by_id) > self._max_messages:
                    self._by_id.popitem(last=False)
            else:
                self._by_id.move_to_end(qid)
            events.append(entry)
            if len(events) > self._max_events:
                del events[0]

    def of(self, queue_id: str) -> list[HistoryEntry]:
        with self._lock:
            return list(self._by_id.get(queue_id, ()))
