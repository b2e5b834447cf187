"""`backupmx queue export`: the held mail of one recipient, or of every recipient of a domain, written
out for an operator to hand over by another channel: one mailbox per recipient, as mbox (mboxrd),
Maildir or one .eml file per message, under DIR.

Streaming: the queue is read a page at a time (Spool.list_messages) and each body chunk by chunk
(Spool.iter_body); a message goes to every selected recipient's mailbox from one read. Bodies are the
stored bytes exactly (our Received header included, CRLF kept); mbox quotes ">*From " lines the mboxrd
way. Maildir and .eml are resumable (a message already there is skipped); an existing mbox file is an
error rather than a silent double. Nothing in the spool changes. Errors: ExportError, SpoolError.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, TextIO

from backupmx.errors import BackupMXError, NotFound
from backupmx.model import MessageKind, MessageRecord, QueueId
from backupmx.spool import QueueFilter, Spool

PAGE = 500
PREFETCH = 16  # small messages read ahead of the one being written
PREFETCH_MAX_SIZE = 256 * 1024  # bigger ones are streamed in their turn, never held whole
OPEN_FILES = 64  # mbox files kept open at once (a domain may have thousands of recipients)
_FROM_LINE = re.compile(rb"(?m)^(>*From )")


class ExportError(BackupMXError):
    pass


class Format(StrEnum):
    MBOX = "mbox"
    MAILDIR = "maildir"
    EML = "eml"


@dataclass(frozen=True, slots=True)
class Selection:
    recipient: str | None = None  # exact address, case-insensitive
    domain: str | None = None
    include_delivered: bool = False  # also messages already delivered but still stored

    def filter(self) -> QueueFilter:
        domain = self.domain or (self.recipient.rpartition("@")[2] if self.recipient else None)
        return QueueFilter(
            domain=domain.lower() if domain else None, recipient=self.recipient, pending_only=not self.include_delivered
        )

    def targets(self, m: MessageRecord) -> list[str]:
        """The selected recipients of `m`, lower-cased, each once."""
        if m.kind is MessageKind.CANARY:
            return []
        out: list[str] = []
        for r in m.recipients:
            addr = r.address.lower()
            if self.recipient is not None and addr != self.recipient.lower():
                continue
            if self.domain is not None and r.domain != self.domain.lower():
                continue
            if not self.include_delivered and r.state.is_final:
                continue
            if addr not in out:
                out.append(addr)
        return out


@dataclass(slots=True)
class ExportResult:
    messages: int = 0  # messages read
    copies: int = 0  # written into a mailbox (a message to two recipients: two copies)
    skipped: int = 0  # already there (Maildir, eml) or gone meanwhile
    bytes: int = 0
    mailboxes: dict[str, Path] = field(default_factory=dict)


def mailbox_name(address: str) -> str:
    """A file name for an address: no path separators, no leading dot."""
    name = re.sub(r"[/\\\x00-\x1f\x7f]", "_", address.strip().lower())
    return "_" + name[1:] if name.startswith(".") else (name or "_")


def from_line(m: MessageRecord) -> bytes:
    sender = re.sub(r"\s", "_", m.envelope.sender) or "MAILER-DAEMON"
    return f"From {sender} {time.asctime(time.gmtime(m.received_at))}\n".encode("utf-8", "replace")


class Progress:
    """A one-line progress bar on a terminal (stderr); a closing line otherwise."""

    def __init__(self, total: int, *, stream: TextIO | None = None, label: str = "export") -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.label = label
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last = 0.0

    def update(self, done: int, nbytes: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.tty or (not force and now - self._last < 0.1):
            return
        self._last = now
        width = 30
        frac = done / self.total if self.total else 1.0
        bar = "#" * int(width * frac) + "." * (width - int(width * frac))
        self.stream.write(
            f"\r{self.label} [{bar}] {done:,}/{self.total:,} messages, "
            f"{nbytes / 1e6:,.1f} MB, {now - self.started:,.1f} s "
        )
        self.stream.flush()

    def finish(self, result: ExportResult, dest: Path) -> None:
        self.update(result.messages, result.bytes, force=True)
        if self.tty:
            self.stream.write("\n")
        self.stream.write(
            f"exported {result.messages:,} messages ({result.copies:,} copies in "
            f"{len(result.mailboxes)} mailbox(es), {result.skipped:,} skipped, "
            f"{result.bytes / 1e6:,.1f} MB) to {dest} in {time.monotonic() - self.started:,.1f} s\n"
        )
        self.stream.flush()


async def count(spool: Spool, sel: Selection) -> int:
    n = 0
    async for _ in _messages(spool, sel):
        n += 1
    return n


async def _messages(spool: Spool, sel: Selection) -> AsyncIterator[tuple[MessageRecord, list[str]]]:
    flt = sel.filter()
    after: QueueId | None = None
    while True:
        page = await spool.list_messages(flt, limit=PAGE, after=after)
        for m in page:
            targets = sel.targets(m)
            if targets:
                yield m, targets
        if len(page) < PAGE:
            return
        after = page[-1].id


class _MboxFiles:
    """Open mbox files, least recently used closed first; each is created exclusively on first use."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.created: set[str] = set()
        self.open: OrderedDict[str, BinaryIO] = OrderedDict()

    def get(self, address: str) -> tuple[BinaryIO, Path]:
        path = self.dest / f"{mailbox_name(address)}.mbox"
        f = self.open.pop(address, None)
        if f is None:
            if address in self.created:
                f = open(path, "ab")  # noqa: SIM115 (kept open; closed by close())
            else:
                try:
                    f = open(path, "xb")  # noqa: SIM115
                except FileExistsError:
                    raise ExportError(f"{path} exists; export into an empty directory") from None
                self.created.add(address)
            if len(self.open) >= OPEN_FILES:
                _, oldest = self.open.popitem(last=False)
                oldest.close()
        self.open[address] = f
        return f, path

    def close(self) -> None:
        for f in self.open.values():
            f.close()
        self.open.clear()


async def export(
    spool: Spool, sel: Selection, fmt: Format, dest: Path, *, progress: Progress | None = None
) -> ExportResult:
    if sel.recipient is None and sel.domain is None:
        raise ExportError("give --recipient ADDRESS or --domain DOMAIN")
    dest.mkdir(parents=True, exist_ok=True)
    result = ExportResult()
    writer = _Writer(dest, fmt, result)
    # Small bodies are read a few messages ahead (each spool read is a thread hop); big ones are
    # streamed chunk by chunk when their turn comes. Memory: at most PREFETCH small bodies at once.
    window: deque[tuple[MessageRecord, list[str], asyncio.Task[list[bytes]] | None]] = deque()
    try:
        async for m, targets in _messages(spool, sel):
            task = asyncio.create_task(_slurp(spool, m.id)) if m.size <= PREFETCH_MAX_SIZE else None
            window.append((m, targets, task))
            if len(window) > PREFETCH:
                await _one(spool, writer, *window.popleft(), progress)
        while window:
            await _one(spool, writer, *window.popleft(), progress)
    finally:
        for _, _, task in window:
            if task is not None:
                task.cancel()
        writer.close()
    if progress is not None:
        progress.finish(result, dest)
    return result


async def _slurp(spool: Spool, message_id: QueueId) -> list[bytes]:
    return [chunk async for chunk in spool.iter_body(message_id)]


async def _replay(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _one(
    spool: Spool,
    writer: _Writer,
    m: MessageRecord,
    targets: list[str],
    task: asyncio.Task[list[bytes]] | None,
    progress: Progress | None,
) -> None:
    result = writer.result
    try:
        body = _replay(await task) if task is not None else spool.iter_body(m.id)
        written = await writer.write(m, targets, body)
    except NotFound:  # delivered and purged since the page was read
        result.skipped += 1
        return
    result.messages += 1
    result.bytes += written
    if progress is not None:
        progress.update(result.messages, result.bytes)


class _Writer:
    """Puts one message into each target's mailbox. A Maildir or .eml file appears under its final
    name only once complete (written to a temporary name, then renamed)."""

    def __init__(self, dest: Path, fmt: Format, result: ExportResult) -> None:
        self.dest = dest
        self.fmt = fmt
        self.result = result
        self.mboxes = _MboxFiles(dest) if fmt is Format.MBOX else None
        self.present: dict[str, set[str]] = {}  # mailbox -> names already there (Maildir, eml)

    def close(self) -> None:
        if self.mboxes is not None:
            self.mboxes.close()

    def _box(self, address: str) -> tuple[Path, set[str]]:
        """The recipient's directory, made once, with the names it already holds."""
        box = self.dest / mailbox_name(address)
        present = self.present.get(address)
        if present is None:
            present = set()
            if self.fmt is Format.MAILDIR:
                for sub in ("tmp", "new", "cur"):
                    (box / sub).mkdir(parents=True, exist_ok=True)
                for sub in ("new", "cur"):
                    present.update(name.split(":", 1)[0] for name in os.listdir(box / sub))
            else:
                box.mkdir(parents=True, exist_ok=True)
                present.update(os.listdir(box))
            self.present[address] = present
        return box, present

    async def write(self, m: MessageRecord, targets: list[str], body: AsyncIterator[bytes]) -> int:
        result = self.result
        outs: list[BinaryIO] = []
        pending: list[tuple[Path, Path]] = []  # (temporary, final)
        complete = False
        try:
            for addr in targets:
                if self.mboxes is not None:
                    f, path = self.mboxes.get(addr)
                    outs.append(f)
                    result.mailboxes[addr] = path
                    continue
                box, present = self._box(addr)
                result.mailboxes[addr] = box
                if self.fmt is Format.MAILDIR:
                    name = f"{int(m.received_at)}.{m.id}.backupmx"
                    final, tmp = box / "new" / name, box / "tmp" / name
                else:
                    name = f"{m.id}.eml"
                    final, tmp = box / name, box / f".{name}.tmp"
                if name in present:
                    result.skipped += 1
                    continue
                present.add(name)
                outs.append(open(tmp, "wb"))  # noqa: SIM115 (closed below)
                pending.append((tmp, final))
            if not outs:
                return 0
            total = await _stream(m, body, outs, mbox=self.mboxes is not None)
            result.copies += len(outs)
            complete = True
            return total
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.mboxes is None:
                for f in outs:
                    f.close()
                for tmp, final in pending:
                    if complete:
                        os.replace(tmp, final)
                    else:
                        tmp.unlink(missing_ok=True)


async def _stream(m: MessageRecord, body: AsyncIterator[bytes], outs: list[BinaryIO], *, mbox: bool) -> int:
    total = 0
    carry = b""
    last = b"\n"
    if mbox:
        for f in outs:
            f.write(from_line(m))
    async for chunk in body:
        total += len(chunk)
        if mbox:  # quote whole lines only: a "From " may straddle two chunks
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            carry, data = data[cut:], _FROM_LINE.sub(rb">\1", data[:cut])
        else:
            data = chunk
        if data:
            last = data[-1:]
        for f in outs:
            f.write(data)
    if mbox:
        tail = _FROM_LINE.sub(rb">\1", carry)
        if tail:
            last = tail[-1:]
        end = tail + (b"" if last == b"\n" else b"\n") + b"\n"  # the message ends with a newline, then a blank
        for f in outs:
            f.write(end)
    return total
