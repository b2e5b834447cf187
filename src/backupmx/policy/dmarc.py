"""DMARC (RFC 7489) as a small evaluator: the policy record of the RFC5322.From domain (or of its
organizational domain), and alignment of the SPF and DKIM results with it. Pure functions; the TXT lookups
are passed in (`txt(name) -> list[str] | None`, raising `TempDnsError` on DNS trouble).

Written here rather than taken from a library: the maintained DMARC packages pull in whole reporting
stacks, while the part a backup needs is the record, two alignment rules and a result word. The
organizational domain comes from the Public Suffix List in Debian's `publicsuffix` package
(/usr/share/publicsuffix/public_suffix_list.dat) and falls back to the last two labels without it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PSL = Path("/usr/share/publicsuffix/public_suffix_list.dat")


class TempDnsError(Exception):
    """A DNS failure that may pass (timeout, SERVFAIL): the result is temperror."""


@dataclass(frozen=True, slots=True)
class DmarcResult:
    result: str  # pass, fail, none, temperror, permerror
    from_domain: str
    policy: str = ""  # the policy that applies: none, quarantine, reject ("" without a record)

    def method(self) -> str:
        comment = f" (p={self.policy})" if self.policy else ""
        return f"dmarc={self.result}{comment} header.from={self.from_domain or 'unknown'}"


@functools.cache
def _suffix_rules() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(plain rules, wildcard parents, exceptions) of the PSL; empty when Debian's file is missing."""
    plain: set[str] = set()
    wild: set[str] = set()
    exceptions: set[str] = set()
    try:
        text = PSL.read_text(encoding="utf-8")
    except OSError:
        return frozenset(), frozenset(), frozenset()
    for line in text.splitlines():
        rule = line.strip().split(" ")[0].lower()
        if not rule or rule.startswith("//"):
            continue
        if rule.startswith("!"):
            exceptions.add(rule[1:])
        elif rule.startswith("*."):
            wild.add(rule[2:])
        else:
            plain.add(rule)
    return frozenset(plain), frozenset(wild), frozenset(exceptions)


def organizational_domain(domain: str) -> str:
    """The registrable domain: one label more than the longest public suffix (RFC 7489 §3.2)."""
    labels = domain.lower().rstrip(".").split(".")
    plain, wild, exceptions = _suffix_rules()
    if not plain:
        return ".".join(labels[-2:])
    suffix_len = 1  # the implicit "*" rule
    for i in range(len(labels)):
        candidate = ".".join(labels[i:])
        if candidate in exceptions:
            suffix_len = len(labels) - i - 1
            break
        parent = ".".join(labels[i + 1 :])
        if candidate in plain or (i + 1 <= len(labels) and parent in wild):
            suffix_len = len(labels) - i
            break
    return ".".join(labels[-(suffix_len + 1) :]) if len(labels) > suffix_len else domain.lower()


def parse_record(text: str) -> dict[str, str] | None:
    """Tags of a DMARC record (`v=DMARC1; p=reject; ...`), None when it is not one."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, eq, value = part.strip().partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1" or tags.get("p", "").lower() not in ("none", "quarantine", "reject"):
        return None
    return tags


def _aligned(domain: str, from_domain: str, strict: bool) -> bool:
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if strict:
        return domain == from_domain
    return organizational_domain(domain) == organizational_domain(from_domain)


def evaluate(
    from_domain: str,
    *,
    spf_result: str,
    spf_domain: str,
    dkim_passes: list[str],
    txt: Callable[[str], list[str] | None],
) -> DmarcResult:
    """The DMARC result for a message whose From domain is `from_domain`, given the SPF result for
    `spf_domain` (the MAIL FROM's domain, or the HELO's for <>) and the d= of every passing DKIM signature."""
    if not from_domain:
        return DmarcResult("permerror", "")
    org = organizational_domain(from_domain)
    try:
        tags = _find_record(from_domain, txt)
        at_org = False
        if tags is None and org != from_domain:
            tags, at_org = _find_record(org, txt), True
    except TempDnsError:
        return DmarcResult("temperror", from_domain)
    if tags is None:
        return DmarcResult("none", from_domain)
    policy = tags["p"].lower()
    if at_org and tags.get("sp", "").lower() in ("none", "quarantine", "reject"):
        policy = tags["sp"].lower()
    spf_ok = spf_result == "pass" and _aligned(spf_domain, from_domain, tags.get("aspf", "r").lower() == "s")
    dkim_ok = any(_aligned(d, from_domain, tags.get("adkim", "r").lower() == "s") for d in dkim_passes)
    return DmarcResult("pass" if spf_ok or dkim_ok else "fail", from_domain, policy)


def _find_record(domain: str, txt: Callable[[str], list[str] | None]) -> dict[str, str] | None:
    records = [r for r in (txt(f"_dmarc.{domain}") or []) if r.lower().startswith("v=dmarc1")]
    if len(records) != 1:  # none, or more than one: no policy (RFC 7489 §6.6.3)
        return None
    return parse_record(records[0])


__all__ = ["DmarcResult", "TempDnsError", "evaluate", "organizational_domain", "parse_record"]
