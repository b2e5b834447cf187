"""Content filters asked after the final dot and before the commit: today rspamd (filter/rspamd.py).

A filter answers with a `Screening`: a refusal (550 5.7.1 or 451 4.7.1, nothing stored) or the body to
store, possibly with header fields added or removed (filter/edit.py). A filter that cannot answer
follows `[filter] on_error`: "accept" stores the message unchanged, "tempfail" answers 451 4.3.0. A
filter never raises for a message; the SMTP server still guards the call (an unknown error = 451).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from backupmx.policy import SessionInfo
from backupmx.reply import Reply
from backupmx.spool.body import BodyBuffer


@dataclass(frozen=True, slots=True)
class Refusal:
    reply: Reply
    log_reason: str  # for the mail log only: the filter's action, score and message


@dataclass(frozen=True, slots=True)
class Screening:
    """What to do with one message: `refusal` set = refuse it; else store `body` (the one given, or an
    edited copy that replaced it: the caller owns whichever is returned and closes it)."""

    body: BodyBuffer
    refusal: Refusal | None = None


class ContentFilter(Protocol):
    name: str

    async def screen(self, session: SessionInfo, queue_id: str, body: BodyBuffer, tmp_dir: Path | None) -> Screening:
        """`session` holds the envelope (sender, recipients) and client facts; `body` the message as it
        would be stored. May close `body` after copying it into the returned one."""
        ...

    async def close(self) -> None: ...


class FilterChain:
    """Filters asked in order (DKIM/DMARC, then rspamd); the first refusal ends the chain."""

    name = "chain"

    def __init__(self, filters: Sequence[ContentFilter]) -> None:
        self.filters = list(filters)

    async def screen(self, session: SessionInfo, queue_id: str, body: BodyBuffer, tmp_dir: Path | None) -> Screening:
        screening = Screening(body)
        for f in self.filters:
            screening = await f.screen(session, queue_id, screening.body, tmp_dir)
            if screening.refusal is not None:
                break
        return screening

    async def close(self) -> None:
        for f in self.filters:
            await f.close()


__all__ = ["ContentFilter", "FilterChain", "Refusal", "Screening"]
