"""Who may receive mail at a served domain, asked at RCPT so that unknown users are refused by us
(550 5.1.1) and the *sender's* MTA bounces: no backscatter.

Each domain has a RecipientDirectory: "any" accepts everyone; a list in the config or "file:PATH" (one
address, or an `@domain` wildcard, per line; `#` starts a comment line; words after the address are
ignored) accepts only those, matched without regard to case; "verify" (asking the primary) is a seam for
later and accepts everyone for now. A directory answers True, False or None ("cannot tell right now");
None follows the domain's `unknown_while_down`. `<postmaster@domain>` is always accepted. A recipient
file is re-read when its mtime, size or inode changes (looked at most once a second) or on `reload()`
(SIGHUP); a file that cannot be read later keeps the last good list; one that cannot be read at start is
a ConfigError.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from backupmx.config import Config, DomainConfig
from backupmx.errors import ConfigError
from backupmx.policy import SessionInfo, Stage, Verdict, domain_of
from backupmx.reply import Reply

log = logging.getLogger("backupmx.policy")

RELOAD_CHECK_INTERVAL = 1.0  # seconds between stat() calls of a recipient file


def user_unknown(address: str) -> Reply:
    return Reply(550, "5.1.1", f"<{address}>: Recipient address rejected: User unknown")


def unverified(address: str) -> Reply:
    return Reply(450, "4.1.1", f"<{address}>: Recipient address rejected: unverified address")


class RecipientDirectory(Protocol):
    """Answers whether `address` (local@domain, domain lower-cased) may receive mail.
    True = known, False = unknown (550 5.1.1), None = cannot tell now (see unknown_while_down)."""

    async def lookup(self, address: str) -> bool | None: ...


class AnyRecipient:
    """Every address of the domain is accepted ("any"; "verify" until verification exists)."""

    async def lookup(self, address: str) -> bool | None:
        return True


class _AddressSet:
    """Exact addresses and `@domain` wildcards, case-insensitive."""

    def __init__(self, entries: Iterable[str], default_domain: str) -> None:
        exact: set[str] = set()
        wild: set[str] = set()
        for raw in entries:
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            entry = entry.split()[0]  # "alice@x.test   # a note": the address is the first word
            if entry.startswith("<") and entry.endswith(">"):
                entry = entry[1:-1]
            if entry.startswith("@"):
                wild.add(entry[1:].lower())
            elif "@" in entry:
                exact.add(entry.casefold())
            else:  # a bare local part means this domain
                exact.add(f"{entry}@{default_domain}".casefold())
        self.exact = frozenset(exact)
        self.wild = frozenset(wild)

    def __contains__(self, address: str) -> bool:
        return address.casefold() in self.exact or domain_of(address) in self.wild

    def __len__(self) -> int:
        return len(self.exact) + len(self.wild)


class StaticRecipients:
    """The list written in the config file."""

    def __init__(self, entries: Iterable[str], domain: str) -> None:
        self._set = _AddressSet(entries, domain)

    async def lookup(self, address: str) -> bool | None:
        return address in self._set


class FileRecipients:
    """A recipient file, re-read when it changes. `monotonic` is injectable for tests."""

    def __init__(self, path: Path, domain: str, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.domain = domain
        self._monotonic = monotonic
        self._set: _AddressSet | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        if not self.reload():
            raise ConfigError(f"recipient file {path} for {domain}: cannot be read")

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self) -> bool:
        """Re-read the file now. False (last good list kept) when it cannot be read."""
        self._checked_at = self._monotonic()
        stamp = self._stat()
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            if self._set is not None:
                log.warning("recipient file %s: cannot be read (%s); keeping the last good list", self.path, e)
            return False
        self._set = _AddressSet(text.splitlines(), self.domain)
        self._stamp = stamp
        log.info("recipient file %s: %d entries", self.path, len(self._set))
        return True

    def _maybe_reload(self) -> None:
        now = self._monotonic()
        if now - self._checked_at < RELOAD_CHECK_INTERVAL:
            return
        self._checked_at = now
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            self.reload()

    async def lookup(self, address: str) -> bool | None:
        self._maybe_reload()
        if self._set is None:
            return None
        return address in self._set


def directory_for(domain: DomainConfig) -> RecipientDirectory:
    spec = domain.recipients
    if isinstance(spec, tuple):
        return StaticRecipients(spec, domain.name)
    if spec.startswith("file:"):
        return FileRecipients(Path(spec[5:]), domain.name)
    if domain.ldap_url is not None:  # filled by policy/ldap.LdapSync; "cannot tell" until then
        from backupmx.policy.ldap import LdapRecipients

        return LdapRecipients(domain.name)
    return AnyRecipient()  # "any", and "verify" until the verifier exists


class RecipientCheck:
    name = "recipients"
    stages = frozenset({Stage.RCPT})

    def __init__(
        self, domains: Iterable[DomainConfig], directories: Mapping[str, RecipientDirectory] | None = None
    ) -> None:
        self._domains = {d.name: d for d in domains}
        self._dirs: dict[str, RecipientDirectory] = {}
        for name, d in self._domains.items():
            self._dirs[name] = (directories or {}).get(name) or directory_for(d)

    @classmethod
    def from_config(cls, cfg: Config) -> RecipientCheck:
        return cls(cfg.domains)

    def directory(self, domain: str) -> RecipientDirectory | None:
        return self._dirs.get(domain.lower())

    def set_directory(self, domain: str, directory: RecipientDirectory) -> None:
        """Swap in another directory (the primary verifier, when it exists)."""
        self._dirs[domain.lower()] = directory

    def reload(self) -> None:
        """SIGHUP: re-read every recipient file now."""
        for d in self._dirs.values():
            if isinstance(d, FileRecipients):
                d.reload()

    async def check(self, stage: Stage, session: SessionInfo, address: str | None) -> Verdict:
        if address is None:
            return Verdict.cont()
        domain = domain_of(address)
        directory = self._dirs.get(domain)
        if directory is None:
            return Verdict.cont()  # not ours: relay control answers that
        local = address.rpartition("@")[0]
        if local.lower() == "postmaster":  # RFC 5321 §4.5.1: always accepted
            return Verdict.accept()
        found = await directory.lookup(address)
        if found:
            return Verdict.cont()
        if found is False:
            return Verdict.reject(user_unknown(address), log_reason="user unknown")
        mode = self._domains[domain].unknown_while_down
        if mode == "reject":
            return Verdict.reject(user_unknown(address), log_reason="recipient not verifiable")
        if mode == "defer":
            return Verdict.defer(unverified(address), log_reason="recipient not verifiable")
        return Verdict.cont()
