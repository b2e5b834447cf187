"""Never say 250 to what the primary can never take: its EHLO (SIZE, SMTPUTF8, 8BITMIME), as the health probe
last saw it while the primary was up, mirrored at our door.

A transaction that asks for what a domain's primary does not offer is refused while the sender is still
on the line: at MAIL when no served domain's primary offers it, else at RCPT for the domains whose
primary does not. SMTPUTF8 → 553 5.6.7, BODY=8BITMIME → 554 5.6.3, SIZE beyond the primary's → 552 5.3.4.
SMTPUTF8 is refused only for what truly needs it at the door, a UTF-8 envelope address: the flag on
all-ASCII mail is dropped on the way to such a primary (RFC 6531 §3.2; delivery/relay.py), and mail whose
header section turns out to need it is bounced there with a DSN.
A primary whose EHLO was never seen has no opinion (everything we offer is accepted). The last answers
live in the spool's kv (namespace "primary_ehlo"), so a restart during an outage keeps them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from backupmx.policy import SessionInfo, Stage, Verdict
from backupmx.reply import Reply
from backupmx.spool import KvStore

log = logging.getLogger("backupmx.policy")

NAMESPACE = "primary_ehlo"
NO_SMTPUTF8 = Reply(553, "5.6.7", "SMTPUTF8 is not supported for this destination")
NO_8BITMIME = Reply(554, "5.6.3", "8-bit MIME is not supported for this destination")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds the destination's maximum message size")


@dataclass(frozen=True, slots=True)
class Offer:
    """What one primary said in its EHLO reply (keywords upper-cased)."""

    keywords: frozenset[str]
    size: int | None  # SIZE's limit; None without SIZE or with "SIZE" / "SIZE 0" (no fixed limit)
    seen_at: float

    @classmethod
    def from_extensions(cls, extensions: Mapping[str, str], seen_at: float) -> Offer:
        """aiosmtplib's `esmtp_extensions` ({"size": "10240000", "8bitmime": "", ...})."""
        size_text = extensions.get("size", extensions.get("SIZE", "")).strip()
        size = int(size_text) if size_text.isdigit() and int(size_text) > 0 else None
        return cls(frozenset(k.upper() for k in extensions), size, seen_at)

    def refusal(self, *, smtputf8: bool, body: str | None, size: int | None) -> Reply | None:
        """`smtputf8`: the transaction needs SMTPUTF8 (a UTF-8 envelope address), not merely asked for it."""
        if smtputf8 and "SMTPUTF8" not in self.keywords:
            return NO_SMTPUTF8
        if body == "8BITMIME" and "8BITMIME" not in self.keywords:
            return NO_8BITMIME
        if size is not None and "SIZE" in self.keywords and self.size is not None and size > self.size:
            return TOO_BIG
        return None

    def to_json(self) -> dict[str, object]:
        return {"keywords": sorted(self.keywords), "size": self.size, "seen_at": self.seen_at}


class PrimaryOffers:
    """The last EHLO offer of each protected domain's primary, in memory and in the kv."""

    def __init__(self, domains: Iterable[str], kv: KvStore, *, wall: Callable[[], float] = time.time) -> None:
        self.domains = frozenset(domains)
        self._kv = kv
        self._wall = wall
        self.offers: dict[str, Offer] = {}

    async def load(self) -> None:
        for d in self.domains:
            try:
                raw = await self._kv.kv_get(NAMESPACE, d)
                if raw is not None:
                    doc = json.loads(raw)
                    self.offers[d] = Offer(frozenset(doc["keywords"]), doc.get("size"), float(doc["seen_at"]))
            except Exception:  # an unreadable record: no opinion until the next probe
                log.exception("primary EHLO of %s: stored answer unreadable", d)

    async def seen(self, domain: str, extensions: Mapping[str, str]) -> None:
        """The health probe got an EHLO answer from `domain`'s primary."""
        offer = Offer.from_extensions(extensions, self._wall())
        old = self.offers.get(domain)
        self.offers[domain] = offer
        if old is not None and old.keywords == offer.keywords and old.size == offer.size:
            return  # written once per change, not once per probe
        try:
            await self._kv.kv_put(NAMESPACE, domain, json.dumps(offer.to_json()).encode())
        except Exception:  # kept in memory; written again at the next change or restart
            log.exception("primary EHLO of %s: cannot store it", domain)


class MirrorCheck:
    name = "primary_ehlo"
    stages = frozenset({Stage.MAIL, Stage.RCPT})

    def __init__(self, offers: PrimaryOffers) -> None:
        self._offers = offers

    def _refusal(self, domain: str, session: SessionInfo, *, utf8_address: bool) -> Reply | None:
        offer = self._offers.offers.get(domain)
        if offer is None:
            return None
        return offer.refusal(smtputf8=session.smtputf8 and utf8_address, body=session.body_type, size=session.size)

    async def check(self, stage: Stage, session: SessionInfo, address: str | None) -> Verdict:
        utf8_sender = not (session.sender or "").isascii()
        if stage is Stage.MAIL:
            refusals = [self._refusal(d, session, utf8_address=utf8_sender) for d in sorted(self._offers.domains)]
            if refusals and all(r is not None for r in refusals):
                reply = refusals[0]
                assert reply is not None
                return Verdict.reject(reply, log_reason="the primary does not offer it")
            return Verdict.cont()
        domain = (address or "").rpartition("@")[2].lower()
        utf8 = utf8_sender or not (address or "").isascii()
        reply = self._refusal(domain, session, utf8_address=utf8) if domain in self._offers.domains else None
        if reply is not None:
            return Verdict.reject(reply, log_reason="the primary does not offer it")
        return Verdict.cont()


__all__ = ["MirrorCheck", "Offer", "PrimaryOffers"]
