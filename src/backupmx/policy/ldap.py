"""Recipients from a directory (`recipients = "ldap://..."`): synced on an interval into the spool's kv.

Each sync is one paged search (ldap3, in a worker thread) under `ldap_base` with `ldap_filter`; the values
of `ldap_attributes` that are addresses of the domain are kept (`mail`, and `proxyAddresses` values with
an `smtp:`/`SMTP:` prefix; `X500:` and the like are skipped). The set is written to the kv (namespace
"ldap", key = domain), so it survives restarts and every node of a shared spool reads it. A directory
that cannot be reached, refuses the bind or times out leaves the last set as it is (frozen) and records
the error; before any sync succeeded, lookups answer "cannot tell" (`unknown_while_down` applies).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from backupmx.clock import iso_time
from backupmx.config import DomainConfig
from backupmx.spool import KvStore, Spool

log = logging.getLogger("backupmx.policy")

NAMESPACE = "ldap"
PAGE_SIZE = 500


class LdapUnavailable(Exception):
    """The directory did not answer the search (the text says why, for the log and `status`)."""


def addresses_from(values: Iterable[str], domain: str) -> set[str]:
    """The addresses of `domain` among attribute values: plain `local@domain`, or `smtp:`/`SMTP:` prefixed
    (Active Directory's proxyAddresses); other prefixes (`X500:`, `sip:`) and other domains are skipped."""
    out: set[str] = set()
    for raw in values:
        v = raw.strip()
        prefix, colon, rest = v.partition(":")
        if colon and "@" not in prefix:
            if prefix.lower() != "smtp":
                continue
            v = rest.strip()
        local, at, dom = v.rpartition("@")
        if at and local and dom.lower().rstrip(".") == domain:
            out.add(f"{local}@{domain}".casefold())
    return out


@dataclass(frozen=True, slots=True)
class SyncState:
    """What `status`, `/metrics` and `recipients list` show for one LDAP domain."""

    domain: str
    synced_at: float | None = None  # the last successful sync
    count: int = 0  # addresses in the set in use
    attempted_at: float | None = None
    error: str = ""  # the last attempt's failure; "" when it succeeded

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "synced_at": self.synced_at,
            "count": self.count,
            "attempted_at": self.attempted_at,
            "error": self.error,
        }


def search_directory(domain: DomainConfig) -> set[str]:
    """One synchronous search (run it in a thread). Raises LdapUnavailable."""
    import ldap3
    from ldap3.core.exceptions import LDAPException

    url = domain.ldap_url
    assert url is not None
    parts = urlsplit(url)
    timeout = max(1, int(domain.ldap_timeout.total_seconds()))  # ldap3 packs it into a socket option: whole seconds
    password = ""
    if domain.ldap_password_file is not None:
        try:
            password = domain.ldap_password_file.read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError) as e:
            raise LdapUnavailable(f"ldap_password_file {domain.ldap_password_file}: cannot be read") from e
    try:
        server = ldap3.Server(
            parts.hostname or "localhost",
            port=parts.port,
            use_ssl=parts.scheme == "ldaps",
            connect_timeout=timeout,
            get_info=ldap3.NONE,
        )
        conn = ldap3.Connection(
            server,
            user=domain.ldap_bind_dn or None,
            password=password or None,
            receive_timeout=timeout,
            raise_exceptions=True,
            read_only=True,
            auto_referrals=False,
        )
        try:
            conn.bind()
            found: set[str] = set()
            entries = conn.extend.standard.paged_search(
                domain.ldap_base,
                domain.ldap_filter,
                attributes=list(domain.ldap_attributes),
                paged_size=PAGE_SIZE,
                generator=True,
            )
            for entry in entries:
                if entry.get("type") != "searchResEntry":
                    continue  # referrals are not followed
                attrs = entry.get("attributes") or {}
                for name in domain.ldap_attributes:
                    value = attrs.get(name)
                    values = value if isinstance(value, list) else [value] if value else []
                    found |= addresses_from((str(v) for v in values), domain.name)
            return found
        finally:
            with contextlib.suppress(LDAPException, OSError):
                conn.unbind()
    except (LDAPException, OSError) as e:
        raise LdapUnavailable(f"{type(e).__name__}: {e}"[:300]) from e


class LdapRecipients:
    """The RecipientDirectory of one LDAP domain: the synced set, kept in memory, loaded from the kv."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self._set: frozenset[str] | None = None
        self.state = SyncState(domain)

    def replace(self, addresses: Iterable[str]) -> None:
        self._set = frozenset(addresses)

    async def lookup(self, address: str) -> bool | None:
        if self._set is None:
            return None  # never synced: cannot tell
        return address.casefold() in self._set


async def read_state(spool: KvStore, domain: str) -> SyncState:
    """The last sync of `domain` as recorded in the kv (cheap: not the addresses)."""
    raw = await spool.kv_get(NAMESPACE, f"{domain}/state")
    if raw is None:
        return SyncState(domain)
    doc = json.loads(raw)
    return SyncState(
        domain, doc.get("synced_at"), int(doc.get("count") or 0), doc.get("attempted_at"), str(doc.get("error") or "")
    )


async def read_addresses(spool: KvStore, domain: str) -> tuple[float, list[str]] | None:
    """The addresses of the last successful sync and when it ended; None when there was none."""
    raw = await spool.kv_get(NAMESPACE, domain)
    if raw is None:
        return None
    doc = json.loads(raw)
    return float(doc["synced_at"]), [str(a) for a in doc["addresses"]]


async def listing(spool: KvStore, domain: DomainConfig) -> dict[str, Any]:
    """What `recipients list` shows of an LDAP domain: the last sync and its addresses (JSON-ready)."""
    state = await read_state(spool, domain.name)
    synced = await read_addresses(spool, domain.name)
    return {
        "url": domain.ldap_url,
        "synced_at": iso_time(state.synced_at),
        "attempted_at": iso_time(state.attempted_at),
        "error": state.error or None,
        "entries": synced[1] if synced else [],
    }


def summary(item: dict[str, Any]) -> str:
    """ "ldap ldap://dir:389, 3 addresses, synced 2026-...; last attempt ... failed: ..." (`recipients list`
    and `status`); `item` has url, count, synced_at, attempted_at and error."""
    text = f"ldap {item['url']}, {item['count']} addresses, "
    text += f"synced {item['synced_at']}" if item["synced_at"] else "never synced (unknown_while_down applies)"
    if item["error"]:
        text += f"; last attempt {item['attempted_at']} failed, the last synced set is kept: {item['error']}"
    return text


class LdapSync:
    """Keeps the LDAP domains' directories in step with the directory server and the kv."""

    def __init__(
        self,
        domains: Iterable[DomainConfig],
        spool: Spool,
        *,
        search: Callable[[DomainConfig], set[str]] = search_directory,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.domains = [d for d in domains if d.ldap_url is not None]
        self.directories = {d.name: LdapRecipients(d.name) for d in self.domains}
        self._spool = spool
        self._search = search
        self._wall = wall
        self._stop = asyncio.Event()

    def states(self) -> list[SyncState]:
        return [d.state for d in self.directories.values()]

    async def load(self) -> None:
        """At start: the last synced sets from the kv (a directory that is down now still has them)."""
        for d in self.domains:
            try:
                state = await read_state(self._spool, d.name)
                synced = await read_addresses(self._spool, d.name)
            except Exception:  # a kv that cannot be read now: the sync below tries again
                log.exception("ldap %s: cannot read the last synced recipients", d.name)
                continue
            directory = self.directories[d.name]
            directory.state = state
            if synced is not None:
                directory.replace(synced[1])

    async def sync(self, domain: DomainConfig) -> SyncState:
        """One attempt for one domain; never raises. On failure the set in use stays (frozen)."""
        directory = self.directories[domain.name]
        now = self._wall()
        try:
            found = await asyncio.to_thread(self._search, domain)
        except LdapUnavailable as e:
            return await self._failed(directory, now, str(e))
        except Exception as e:  # an unforeseen answer: same as unreachable, the last set stays
            log.exception("ldap %s: sync failed", domain.name)
            return await self._failed(directory, now, f"{type(e).__name__}: {e}"[:300])
        state = SyncState(domain.name, now, len(found), now, "")
        try:
            doc = {"synced_at": now, "addresses": sorted(found)}
            await self._spool.kv_put(NAMESPACE, domain.name, json.dumps(doc).encode())
            await self._spool.kv_put(NAMESPACE, f"{domain.name}/state", json.dumps(state.to_json()).encode())
        except Exception:  # the set is used in memory; the kv is written again at the next sync
            log.exception("ldap %s: cannot store the synced recipients", domain.name)
        directory.replace(found)
        directory.state = state
        log.info("ldap %s: %d addresses synced", domain.name, len(found))
        return state

    async def _failed(self, directory: LdapRecipients, now: float, error: str) -> SyncState:
        old = directory.state
        state = SyncState(directory.domain, old.synced_at, old.count, now, error)
        log.warning(
            "ldap %s: directory unavailable (%s); keeping the %d addresses of the last sync",
            directory.domain,
            error,
            old.count,
        )
        directory.state = state
        with contextlib.suppress(Exception):  # a record of the failure; the next attempt writes again
            synced = await read_addresses(self._spool, directory.domain)
            if synced is not None and (old.synced_at is None or synced[0] > old.synced_at):
                directory.replace(synced[1])  # another node synced since: use its set
                state = SyncState(directory.domain, synced[0], len(synced[1]), now, error)
                directory.state = state
            await self._spool.kv_put(NAMESPACE, f"{directory.domain}/state", json.dumps(state.to_json()).encode())
        return state

    async def run(self) -> None:
        """Sync every domain each `ldap_interval` until `stop()` (call `load()` first)."""
        due = {d.name: 0.0 for d in self.domains}
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            for d in self.domains:
                if loop.time() >= due[d.name]:
                    await self.sync(d)
                    due[d.name] = loop.time() + d.ldap_interval.total_seconds()
            wait = max(0.05, min(due.values()) - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=wait)

    def stop(self) -> None:
        self._stop.set()


__all__ = [
    "LdapRecipients",
    "LdapSync",
    "LdapUnavailable",
    "SyncState",
    "addresses_from",
    "listing",
    "read_addresses",
    "read_state",
    "summary",
]
