"""Which configured domains make this node a backscatter source: `recipients = "any"` with `accept = "always"`.

Such a domain takes mail for every local part while the primary is up, so whatever the primary refuses
later is bounced by us to a sender address that is usually forged. `config check` and `backupmx check
--config` both warn with the same words; nothing here refuses a configuration (a catch-all primary is a
legitimate reason for "any").
"""

from __future__ import annotations

from backupmx.config import Config, DomainConfig

ADVICE = 'use a list, "file:PATH", "verify" or "ldap://..." for recipients, or accept = "when_primary_down"'


def backscatter_prone(domain: DomainConfig) -> bool:
    return domain.recipients == "any" and domain.accept == "always"


def backscatter_warnings(cfg: Config) -> list[str]:
    """One line per risky domain, naming the file and the keys (for `config check`)."""
    return [
        f'{cfg.source}: domains[{i}]({d.name}).recipients: "any" with accept = "always" accepts every '
        f"local part, and what the primary refuses later is bounced to (often forged) senders: {ADVICE}"
        for i, d in enumerate(cfg.domains)
        if backscatter_prone(d)
    ]
