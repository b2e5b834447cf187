"""What backupmx has learned about recipients of `recipients = "verify"` domains: the primary's answers
to RCPT probes, addresses deliveries succeeded to, and the operator's own entries.

Kept in the spool's shared key-value table (namespace "learned", key "domain/local-part", case-folded;
the Spool contract's kv_get/kv_put/kv_delete/kv_list), so it survives restarts and every node of a PostgreSQL
spool sees what one node learned. An entry carries its own *logical* expiry (the verify TTLs); the
row's physical expiry in the kv table is later by `keep` (default: delivery.retention_cap), because
while a primary is DOWN the learned set is frozen and must outlive its TTLs. Entries added by the
operator never expire. Storage errors are raised as they come (the verifier treats them as "cannot tell").
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from backupmx.spool import KV_LIST_MAX, KvStore

NAMESPACE = "learned"


class Source:
    PROBE = "probe"  # the primary answered a RCPT probe
    DELIVERED = "delivered"  # the primary took a message for the address
    OPERATOR = "operator"  # `backupmx recipients add`
    IMPORT = "import"  # `backupmx recipients import`


@dataclass(frozen=True, slots=True)
class LearnedRecipient:
    address: str  # local@domain as first seen (the key is case-folded)
    known: bool  # True: the primary accepts it; False: it said 550 5.1.1
    source: str  # Source.*
    learned_at: float
    expires_at: float | None  # logical expiry; None = until removed (operator entries)

    def fresh(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


def learned_key(address: str) -> str:
    """ "Alice@Example.TEST" -> "example.test/alice"."""
    local, _, domain = address.rpartition("@")
    return f"{domain.lower()}/{local.casefold()}"


def _encode(entry: LearnedRecipient) -> bytes:
    return json.dumps(
        {"a": entry.address, "k": entry.known, "s": entry.source, "at": entry.learned_at, "exp": entry.expires_at},
        separators=(",", ":"),
    ).encode()


def _decode(raw: bytes) -> LearnedRecipient | None:
    try:
        d = json.loads(raw)
        exp = d.get("exp")
        return LearnedRecipient(
            str(d["a"]), bool(d["k"]), str(d.get("s", "")), float(d["at"]), None if exp is None else float(exp)
        )
    except (ValueError, KeyError, TypeError):
        return None  # a damaged row is as good as none: the address is asked again


@dataclass(frozen=True, slots=True)
class LearnedPage:
    """A page of `LearnedRecipients.page`."""

    entries: list[LearnedRecipient]  # the readable entries of the page, in key order
    damaged: int  # rows of the page that could not be read (skipped)
    next: str | None  # the raw key to page on from (`after`); None: this was the last page


class LearnedRecipients:
    """The learned set over a spool's kv table."""

    def __init__(self, kv: KvStore, *, keep: float = 90 * 86400.0) -> None:
        self._kv = kv
        self._keep = keep

    @property
    def kv(self) -> KvStore:
        """The kv underneath (the recipients CLI also reads the LDAP domains' records from it)."""
        return self._kv

    async def get(self, address: str) -> LearnedRecipient | None:
        raw = await self._kv.kv_get(NAMESPACE, learned_key(address))
        return None if raw is None else _decode(raw)

    async def put(self, entry: LearnedRecipient) -> None:
        physical = None if entry.expires_at is None else entry.expires_at + self._keep
        await self._kv.kv_put(
            NAMESPACE, learned_key(entry.address), _encode(entry), expires_at=physical, now=entry.learned_at
        )

    async def delete(self, address: str) -> bool:
        return await self._kv.kv_delete(NAMESPACE, learned_key(address))

    async def page(self, domain: str, *, after: str | None = None, limit: int = KV_LIST_MAX) -> LearnedPage:
        """One page of the domain's rows in key order: `after` is a raw key (a previous page's `next`; None:
        from the start). Damaged rows are counted and skipped, but the paging follows the raw rows, so they
        never end a listing early. Rows the kv table has expired (logical expiry + `keep`) are not listed."""
        limit = max(1, min(limit, KV_LIST_MAX))
        items = await self._kv.kv_list(NAMESPACE, prefix=f"{domain.lower()}/", after=after, limit=limit)
        entries: list[LearnedRecipient] = []
        damaged = 0
        for item in items:
            entry = _decode(item.value)
            # A readable row that does not key back to where it is stored is damaged as well.
            if entry is None or learned_key(entry.address) != item.key:
                damaged += 1
            else:
                entries.append(entry)
        return LearnedPage(entries, damaged, items[-1].key if len(items) >= limit else None)

    async def pages(self, domain: str, *, limit: int = KV_LIST_MAX) -> AsyncIterator[LearnedPage]:
        """Every page of the domain's rows, in key order."""
        after: str | None = None
        while True:
            page = await self.page(domain, after=after, limit=limit)
            yield page
            if page.next is None:
                return
            after = page.next

    async def list(self, domain: str) -> list[LearnedRecipient]:
        """Every readable entry of the domain, in key order (damaged rows skipped)."""
        return [entry async for page in self.pages(domain) for entry in page.entries]


__all__ = ["NAMESPACE", "KvStore", "LearnedPage", "LearnedRecipient", "LearnedRecipients", "Source", "learned_key"]
