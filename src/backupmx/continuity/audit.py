"""The emergency inbox's audit log: one JSON line per grant, revocation, link, sign-in (accepted or
refused), view and download, appended to `data_dir/continuity-audit.log` (mode 0600) by the CLI and by
`serve` alike. O_APPEND writes of one short line are atomic, so both may write at once. Each node keeps
its own file; no token, cookie or message content is ever written, only queue IDs and addresses.
A failed write is logged and never stops the inbox (the event still happens)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backupmx.logfailures import FAILURES, LogName

log = logging.getLogger("backupmx.continuity")

AUDIT_FILE = "continuity-audit.log"
MAX_LINE = 4096


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: float
    event: str  # grant | revoke | link | notify | signin | signin-refused | signout | list | view | ...
    actor: str  # "cli", or the client's IP for the inbox
    address: str | None
    fields: dict[str, Any]

    def to_line(self) -> str:
        doc = {"at": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="seconds"), "t": self.at,
               "event": self.event, "actor": self.actor, "address": self.address, **self.fields}
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))[:MAX_LINE]


class AuditLog:
    def __init__(self, path: Path, *, node: str = "") -> None:
        self.path = path
        self.node = node

    def write(self, at: float, event: str, *, actor: str, address: str | None = None, **fields: Any) -> None:
        if self.node:
            fields.setdefault("node", self.node)
        try:
            line = AuditEvent(at, event, actor, address, fields).to_line() + "\n"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
        except Exception as e:  # ENOSPC and friends: counted, reported once a minute (logfailures)
            FAILURES.failed(LogName.CONTINUITY_AUDIT, e, self.path)
        else:
            FAILURES.succeeded(LogName.CONTINUITY_AUDIT, self.path)

    def read(self, *, since: float = 0.0, address: str | None = None) -> Iterator[AuditEvent]:
        """Events in file order (oldest first), streamed; damaged lines are skipped."""
        try:
            f = open(self.path, encoding="utf-8", errors="replace")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            return
        with f:
            for raw in f:
                try:
                    doc = json.loads(raw)
                    at = float(doc.pop("t"))
                    doc.pop("at", None)
                    ev = AuditEvent(at, str(doc.pop("event")), str(doc.pop("actor")), doc.pop("address", None),
                                    doc)
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
                if ev.at < since:
                    continue
                if address is not None and (ev.address or "").lower() != address.lower() and \
                        ev.fields.get("domain") != address.lower().lstrip("@"):
                    continue
                yield ev
