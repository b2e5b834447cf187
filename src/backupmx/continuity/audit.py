"""The emergency inbox's audit log: one JSON line per grant, revocation, link, sign-in, view and download,
appended to `data_dir/continuity-audit.log` (mode 0600) by the CLI and by `serve` alike. O_APPEND writes
of one short line are atomic, so both may write at once. Each node keeps its own file; no token, cookie
or message content is ever written, only queue IDs and addresses.
Refusals (a forged or spent link, a wrong message URL) are aggregated per client network: the first of a
burst is written at once, the rest as one line with a count when the burst ends (or each minute while it
lasts). The file is capped: past `max_bytes` it is renamed to `.1` (the one before is dropped), so the
log takes at most twice `max_bytes`. A failed write is logged and never stops the inbox."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backupmx.logfailures import FAILURES, LogName

log = logging.getLogger("backupmx.continuity")

AUDIT_FILE = "continuity-audit.log"
MAX_LINE = 4096
MAX_BYTES = 16 * 1024 * 1024  # then rotated to .1: at most 32 MiB on disk
BURST_GAP = 60.0  # a refusal this long after the last one of its client starts a new burst
MAX_BURSTS = 10_000  # clients tracked at once; past it the stalest burst is written out early


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: float
    event: str  # grant | revoke | link | notify | signin | signin-refused | signout | list | view | ...
    actor: str  # "cli", or the client's IP for the inbox
    address: str | None
    fields: dict[str, Any]

    def to_line(self) -> str:
        doc = {
            "at": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="seconds"),
            "t": self.at,
            "event": self.event,
            "actor": self.actor,
            "address": self.address,
            **self.fields,
        }
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))[:MAX_LINE]


@dataclass(slots=True)
class _Burst:
    actor: str
    first: float  # the first refusal not yet written as part of a count
    last: float
    written: float  # when the burst last wrote a line
    count: int = 0  # refusals since then
    why: dict[str, int] = field(default_factory=dict)


class AuditLog:
    def __init__(self, path: Path, *, node: str = "", max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.node = node
        self.max_bytes = max_bytes
        self._bursts: dict[tuple[str, str], _Burst] = {}

    @property
    def rotated(self) -> Path:
        return self.path.with_name(self.path.name + ".1")

    def write(self, at: float, event: str, *, actor: str, address: str | None = None, **fields: Any) -> None:
        if self.node:
            fields.setdefault("node", self.node)
        try:
            line = AuditEvent(at, event, actor, address, fields).to_line() + "\n"
            self._append(line.encode("utf-8"))
        except Exception as e:  # ENOSPC and friends: counted, reported once a minute (logfailures)
            FAILURES.failed(LogName.CONTINUITY_AUDIT, e, self.path)
        else:
            FAILURES.succeeded(LogName.CONTINUITY_AUDIT, self.path)

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if os.fstat(fd).st_size + len(data) > self.max_bytes:
                # Another writer may rotate at the same moment: at worst one older generation is lost,
                # never the cap. This line then goes to the fresh file.
                os.close(fd)
                fd = -1
                os.replace(self.path, self.rotated)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.write(fd, data)
        finally:
            if fd >= 0:
                os.close(fd)

    def refusal(
        self, at: float, event: str, *, actor: str, client: str, why: str, address: str | None = None, **fields: Any
    ) -> None:
        """A refused attempt by `client` (its network, signinlimit.client_network): the first of a burst is
        written now, with its details; later ones are counted into one line (see flush)."""
        key = (event, client)
        burst = self._bursts.get(key)
        if burst is not None and at - burst.last <= BURST_GAP:
            burst.last = at
            if burst.count == 0:
                burst.first = at
            burst.count += 1
            burst.why[why] = burst.why.get(why, 0) + 1
            if at - burst.written >= BURST_GAP:  # a long burst still writes once a minute
                self._write_burst(event, burst)
            return
        if burst is not None:
            self._write_burst(event, burst)
        if len(self._bursts) >= MAX_BURSTS:
            stalest = min(self._bursts, key=lambda k: self._bursts[k].last)
            self._write_burst(stalest[0], self._bursts.pop(stalest))
        self._bursts[key] = _Burst(actor, at, at, at)
        self.write(at, event, actor=actor, address=address, why=why, **fields)

    def _write_burst(self, event: str, burst: _Burst) -> None:
        if burst.count:
            self.write(
                burst.last,
                event,
                actor=burst.actor,
                count=burst.count,
                why=dict(burst.why),
                first=datetime.fromtimestamp(burst.first, UTC).isoformat(timespec="seconds"),
            )
        burst.count = 0
        burst.why = {}
        burst.written = burst.last

    def flush(self, now: float, *, everything: bool = False) -> None:
        """Write the counts of bursts that have ended (all of them with `everything`, at stop)."""
        for key, burst in list(self._bursts.items()):
            if everything or now - burst.last > BURST_GAP:
                self._write_burst(key[0], burst)
                del self._bursts[key]

    def read(self, *, since: float = 0.0, address: str | None = None) -> Iterator[AuditEvent]:
        """Events in file order (oldest first), streamed; damaged lines are skipped."""
        for path in (self.rotated, self.path):
            yield from self._read_file(path, since, address)

    def _read_file(self, path: Path, since: float, address: str | None) -> Iterator[AuditEvent]:
        try:
            f = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            return
        with f:
            for raw in f:
                try:
                    doc = json.loads(raw)
                    at = float(doc.pop("t"))
                    doc.pop("at", None)
                    ev = AuditEvent(at, str(doc.pop("event")), str(doc.pop("actor")), doc.pop("address", None), doc)
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
                if ev.at < since:
                    continue
                if (
                    address is not None
                    and (ev.address or "").lower() != address.lower()
                    and ev.fields.get("domain") != address.lower().lstrip("@")
                ):
                    continue
                yield ev
