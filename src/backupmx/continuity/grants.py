"""Who may read held mail, kept in the spool's shared kv so that the CLI, `serve` and every node of a
shared spool see the same thing: grants (per address or per domain), one-time sign-in links, the IDs
of links already used, and signed-in sessions.

- A link is single use because redeeming it *deletes* its record: of two concurrent redemptions (two
  browsers, two nodes) exactly one delete finds the row. The used link ID is then recorded too, so a
  second use is refused with a clear reason, across restarts and nodes.
- A session is stored under the hash of its cookie and lives no longer than `session_ttl` nor than
  its grant; every request checks that the grant still exists with the same ID, so `access revoke`
  (or a new grant replacing an old one) ends sessions and outstanding links at once.
Errors: LinkRefused for a link that cannot be used; GrantError for an operator mistake; SpoolError from
the spool passes through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from backupmx.clock import Clock
from backupmx.continuity.tokens import (
    LinkClaims,
    LinkRefused,
    Refusal,
    Signer,
    new_id,
    normalize_address,
    session_key,
)
from backupmx.errors import BackupMXError
from backupmx.model import MessageKind
from backupmx.spool import KV_LIST_MAX, KvStore, QueueFilter, Spool

NS_GRANT = "continuity.grant"  # key: "alice@example.com" or "@example.com"; `access list` lists them
# Before the Spool contract had kv_list, a JSON list of subjects was kept here (key "grants") for
# `access list`. It is no longer read nor written: every grant it named is in NS_GRANT anyway.
NS_INDEX = "continuity.index"
NS_LINK = "continuity.link"  # key: link ID; deleted when used
NS_USED = "continuity.used"  # key: link ID; kept until well after the link would have expired
NS_SESSION = "continuity.session"  # key: hash of the session cookie
USED_KEEP_SECONDS = 30 * 86400


class GrantError(BackupMXError):
    """An operator's request that cannot be done (no grant, not a protected domain, ...)."""


@dataclass(frozen=True, slots=True)
class Grant:
    subject: str  # "alice@example.com", or "@example.com" for every recipient of the domain
    id: str  # changes with every grant: links and sessions name it
    created_at: float
    expires_at: float
    by: str

    @property
    def is_domain(self) -> bool:
        return self.subject.startswith("@")

    @property
    def domain(self) -> str:
        return self.subject.rpartition("@")[2]

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "id": self.id,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "by": self.by,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Grant:
        return cls(
            str(doc["subject"]),
            str(doc["id"]),
            float(doc["created_at"]),
            float(doc["expires_at"]),
            str(doc.get("by", "")),
        )


@dataclass(frozen=True, slots=True)
class IssuedLink:
    token: str
    address: str
    expires_at: float  # of the link (a session may last until the grant's end)
    grant: Grant


@dataclass(frozen=True, slots=True)
class Session:
    address: str
    key: str  # hash of the cookie value: CSRF tokens are bound to it
    grant_id: str
    expires_at: float


def subject_of(address_or_domain: str, *, domain: bool = False) -> str:
    s = normalize_address(address_or_domain)
    if domain:
        return "@" + s.lstrip("@")
    if s.count("@") != 1 or s.startswith("@") or s.endswith("@"):
        raise GrantError(f"{address_or_domain!r} is not an address such as alice@example.com")
    return s


class AccessStore:
    def __init__(self, kv: KvStore, signer: Signer, clock: Clock) -> None:
        self.kv = kv
        self.signer = signer
        self.clock = clock

    # -- grants ------------------------------------------------------------------------------------
    async def grant(self, subject: str, *, expires_at: float, by: str) -> Grant:
        """Grant (or renew) access; a new grant ID ends the links and sessions of the one it replaces."""
        now = self.clock.now()
        if expires_at <= now:
            raise GrantError("the grant would already have expired")
        g = Grant(subject, new_id(12), now, expires_at, by)
        await self.kv.kv_put(NS_GRANT, subject, json.dumps(g.to_json()).encode(), expires_at=expires_at, now=now)
        return g

    async def revoke(self, subject: str) -> bool:
        return await self.kv.kv_delete(NS_GRANT, subject)

    async def get_grant(self, subject: str) -> Grant | None:
        raw = await self.kv.kv_get(NS_GRANT, subject)
        return None if raw is None else self._live(raw)

    def _live(self, raw: bytes) -> Grant | None:
        """The grant stored as `raw` while it lasts; None when it has ended or cannot be read."""
        try:
            g = Grant.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError):
            return None
        return g if g.expires_at > self.clock.now() else None

    async def grant_for(self, address: str) -> Grant | None:
        """The grant that lets `address` in: its own, or its domain's; the longer-lasting one."""
        address = normalize_address(address)
        found = [
            g
            for g in (await self.get_grant(address), await self.get_grant("@" + address.rpartition("@")[2]))
            if g is not None
        ]
        return max(found, key=lambda g: g.expires_at) if found else None

    async def grant_alive(self, address: str, grant_id: str) -> Grant | None:
        """The grant `grant_id` when it still lets `address` in (not revoked, replaced or ended)."""
        address = normalize_address(address)
        for subject in (address, "@" + address.rpartition("@")[2]):
            g = await self.get_grant(subject)
            if g is not None and g.id == grant_id:
                return g
        return None

    async def grants(self) -> list[Grant]:
        """Live grants, by domain, the domain's own grant first, then by subject."""
        out: list[Grant] = []
        after: str | None = None
        while True:
            page = await self.kv.kv_list(NS_GRANT, after=after)
            out.extend(g for item in page if (g := self._live(item.value)) is not None)
            if len(page) < KV_LIST_MAX:
                break
            after = page[-1].key
        return sorted(out, key=lambda g: (g.domain, not g.is_domain, g.subject))

    # -- links -------------------------------------------------------------------------------------
    async def issue_link(self, address: str, *, ttl: float) -> IssuedLink:
        address = subject_of(address)
        g = await self.grant_for(address)
        if g is None:
            raise GrantError(f"{address} has no access grant: run `backupmx access grant {address}` first")
        now = self.clock.now()
        expires_at = min(now + ttl, g.expires_at)
        claims = LinkClaims(link_id=new_id(16), address=address, grant_id=g.id, expires_at=expires_at)
        record = {"address": address, "grant": g.id, "expires_at": expires_at, "issued_at": now}
        await self.kv.kv_put(NS_LINK, claims.link_id, json.dumps(record).encode(), expires_at=expires_at, now=now)
        return IssuedLink(self.signer.sign_link(claims), address, expires_at, g)

    async def peek(self, token: str) -> LinkClaims:
        """The claims of a link that could still be used (for the page before the button); consumes
        nothing. Raises LinkRefused."""
        claims = self.signer.verify_link(token, now=self.clock.now())
        if await self.kv.kv_get(NS_USED, claims.link_id) is not None:
            raise LinkRefused(Refusal.USED, claims.address)
        if await self.grant_alive(claims.address, claims.grant_id) is None:
            raise LinkRefused(Refusal.REVOKED, claims.address)
        return claims

    async def redeem(self, token: str, *, session_ttl: float, used_by: str = "") -> tuple[Session, str]:
        """Exchange a link for a new session: (session, cookie value). Once only; raises LinkRefused."""
        claims = await self.peek(token)
        if not await self.kv.kv_delete(NS_LINK, claims.link_id):
            # the record is gone: used a moment ago (elsewhere), or never issued by this installation
            raise LinkRefused(Refusal.USED, claims.address)
        now = self.clock.now()
        await self.kv.kv_put(
            NS_USED,
            claims.link_id,
            json.dumps({"at": now, "by": used_by}).encode(),
            expires_at=claims.expires_at + USED_KEEP_SECONDS,
            now=now,
        )
        g = await self.grant_alive(claims.address, claims.grant_id)
        if g is None:  # revoked between the check and the delete
            raise LinkRefused(Refusal.REVOKED, claims.address)
        cookie = new_id(32)
        s = Session(claims.address, session_key(cookie), g.id, min(now + session_ttl, g.expires_at))
        await self.kv.kv_put(
            NS_SESSION,
            s.key,
            json.dumps({"address": s.address, "grant": s.grant_id, "expires_at": s.expires_at}).encode(),
            expires_at=s.expires_at,
            now=now,
        )
        return s, cookie

    # -- sessions ----------------------------------------------------------------------------------
    async def session(self, cookie: str | None) -> Session | None:
        """The live session of a cookie: unexpired, and its grant still the same one."""
        if not cookie or len(cookie) > 256:
            return None
        key = session_key(cookie)
        raw = await self.kv.kv_get(NS_SESSION, key)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            s = Session(str(doc["address"]), key, str(doc["grant"]), float(doc["expires_at"]))
        except (ValueError, KeyError, TypeError):
            return None
        if s.expires_at <= self.clock.now():
            return None
        if await self.grant_alive(s.address, s.grant_id) is None:
            return None
        return s

    async def end_session(self, session: Session) -> None:
        await self.kv.kv_delete(NS_SESSION, session.key)


async def held_recipients(spool: Spool, domain: str) -> dict[str, int]:
    """Each recipient of `domain` with held (pending) mail, with how many messages (`access grant --domain`
    issues a link to each)."""
    out: dict[str, int] = {}
    after = None
    while True:
        page = await spool.list_messages(QueueFilter(domain=domain), limit=500, after=after)
        for m in page:
            if m.kind is MessageKind.CANARY:
                continue
            for addr in {r.address.lower() for r in m.recipients if r.domain == domain and not r.state.is_final}:
                out[addr] = out.get(addr, 0) + 1
        if len(page) < 500:
            return out
        after = page[-1].id
