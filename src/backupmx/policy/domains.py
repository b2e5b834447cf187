"""Relay control: RCPT is allowed only for the configured domains, compared exactly after lower-casing.

No trailing dot (`u@ours.`), no lookalike (`u@ours.evil.test`), no IP literal (`u@[192.0.2.1]`), no
routing on `%` or `!` in the local part (they are plain characters; the domain is what follows the last
`@`). Anything else gets `554 5.7.1 <addr>: Relay access denied`, as Postfix words it. Also home to
`build_checks`, the ordered check chain the composition root hands to the SMTP server.
"""

from __future__ import annotations

from collections.abc import Iterable

from backupmx.config import Config
from backupmx.policy import Check, SessionInfo, Stage, Verdict, domain_of
from backupmx.policy.recipients import RecipientCheck
from backupmx.reply import Reply


def relay_denied(address: str) -> Reply:
    return Reply(554, "5.7.1", f"<{address}>: Relay access denied")


class RelayControl:
    name = "relay"
    stages = frozenset({Stage.RCPT})

    def __init__(self, domains: Iterable[str]) -> None:
        self._domains = frozenset(d.lower() for d in domains)

    @classmethod
    def from_config(cls, cfg: Config) -> RelayControl:
        return cls(cfg.domain_names)

    def serves(self, domain: str) -> bool:
        return domain in self._domains

    async def check(self, stage: Stage, session: SessionInfo, address: str | None) -> Verdict:
        if address is None:
            return Verdict.cont()
        domain = domain_of(address)
        if domain and domain in self._domains:
            return Verdict.cont()
        return Verdict.reject(relay_denied(address), log_reason="relay")


def build_checks(cfg: Config) -> list[Check]:
    """The checks in the order they run: relay control first (it must see every RCPT), then the
    recipient lists. Raises ConfigError when a recipient file cannot be read at start."""
    return [RelayControl.from_config(cfg), RecipientCheck.from_config(cfg)]


__all__ = ["RelayControl", "build_checks", "domain_of", "relay_denied"]
