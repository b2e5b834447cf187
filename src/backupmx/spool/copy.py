"""Moving a queue from one spool backend to another (SQLite <-> PostgreSQL) without losing a message.

`copy_spool` pages through the source's pending messages in arrival order and stores each in the
destination under the same queue ID, body streamed through a BodyBuffer (never whole in memory),
then reads it back and compares the checksum. The destination's `put_record` (the Spool contract; both
backends have it) makes an exact copy: arrival time and every recipient's state, attempts, next
attempt, last reply and hold. A spool without it (an older or a test one) gets `put_with_id` with the
recipients still pending, due at once; a message with a held recipient is held whole (never delivered
unreviewed); the report lists these as approximate. Idempotent: messages already in the destination are skipped, so an
interrupted copy is simply run again. Nodes should be stopped while it runs (a message delivered from
the source after it was copied would be delivered again from the destination).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from backupmx.errors import NotFound, SpoolError
from backupmx.model import MessageKind, MessageRecord, QueueId, Recipient, RecipientState
from backupmx.spool import BodyBuffer, QueueFilter, Spool

PAGE = 200
ALL_KINDS = tuple(k.value for k in MessageKind)


@runtime_checkable
class ExactImport(Protocol):
    async def put_record(self, message: MessageRecord, body: BodyBuffer) -> None:
        """Store `message` exactly (ID, arrival, recipients' states) with `body`; SpoolError if the ID exists."""
        ...


@dataclass(frozen=True, slots=True)
class CopyProgress:
    done: int  # messages looked at (copied, skipped or failed)
    total: int  # pending messages in the source when the copy started (an estimate if it changes)
    bytes_copied: int


@dataclass(frozen=True, slots=True)
class CopyReport:
    copied: int
    already_there: int
    bytes_copied: int
    failed: tuple[tuple[QueueId, str], ...]  # not copied: damaged in the source, or refused by the destination
    approximate: tuple[QueueId, ...]  # copied without put_record: states reduced to queued/held


async def copy_spool(
    src: Spool,
    dst: Spool,
    progress: Callable[[CopyProgress], None] | None = None,
    *,
    tmp_dir: Path | None = None,
    verify: bool = True,
    page: int = PAGE,
) -> CopyReport:
    """Copy every pending message of `src` into `dst` (both opened). See the module docstring."""
    total = await src.count_pending(include_kinds=ALL_KINDS)
    exact = isinstance(dst, ExactImport)
    done = copied = already = nbytes = 0
    failed: list[tuple[QueueId, str]] = []
    approximate: list[QueueId] = []
    after: QueueId | None = None
    while True:
        batch = await src.list_messages(QueueFilter(pending_only=True), limit=page, after=after)
        for message in batch:
            done += 1
            if await dst.get(message.id) is not None:
                already += 1
            else:
                problem = await _copy_one(src, dst, message, exact=exact, tmp_dir=tmp_dir, verify=verify)
                if problem is None:
                    copied += 1
                    nbytes += message.size
                    if not exact:
                        approximate.append(message.id)
                else:
                    failed.append((message.id, problem))
            if progress is not None:
                progress(CopyProgress(done=done, total=max(total, done), bytes_copied=nbytes))
        if len(batch) < page:
            break
        after = batch[-1].id
    return CopyReport(
        copied=copied, already_there=already, bytes_copied=nbytes, failed=tuple(failed), approximate=tuple(approximate)
    )


async def _copy_one(
    src: Spool, dst: Spool, message: MessageRecord, *, exact: bool, tmp_dir: Path | None, verify: bool
) -> str | None:
    """None when copied (and verified); else why not."""
    with BodyBuffer(tmp_dir) as body:
        crc = 0
        try:
            async for chunk in src.iter_body(message.id):
                body.write(chunk)
                crc = zlib.crc32(chunk, crc)
        except NotFound:
            return "gone from the source while copying"
        except SpoolError as e:
            return f"unreadable in the source: {e}"
        try:
            if exact:
                assert isinstance(dst, ExactImport)
                await dst.put_record(message, body)
            else:
                await _put_approximately(dst, message, body)
        except SpoolError as e:
            return f"refused by the destination: {e}"
    if verify:
        return await _verify(dst, message, crc, exact=exact)
    return None


async def _put_approximately(dst: Spool, message: MessageRecord, body: BodyBuffer) -> None:
    pending = [r for r in message.recipients if not r.state.is_final]
    env_rcpts = message.envelope.recipients
    recipients = tuple(
        env_rcpts[r.index]
        if 0 <= r.index < len(env_rcpts) and env_rcpts[r.index].address == r.address
        else Recipient(r.address, r.notify, r.orcpt)
        for r in pending
    )
    envelope = dataclasses.replace(message.envelope, recipients=recipients)
    await dst.put_with_id(message.id, envelope, body, now=message.received_at)
    held = [r for r in pending if r.state is RecipientState.HELD]
    if held:
        await dst.hold(message.id, reason=held[0].held_reason or "copy", now=message.received_at)


async def _verify(dst: Spool, message: MessageRecord, crc: int, *, exact: bool) -> str | None:
    copy = await dst.get(message.id)
    if copy is None:
        return "missing from the destination after the copy"
    if copy.size != message.size or copy.received_at != message.received_at:
        return "size or arrival differs in the destination"
    want = [(r.address, r.state) for r in message.recipients if exact or not r.state.is_final]
    got = [(r.address, r.state) for r in copy.recipients]
    if exact and want != got:
        return f"recipient states differ in the destination: {got} != {want}"
    if not exact and [a for a, _ in want] != [a for a, _ in got]:
        return "recipients differ in the destination"
    check = 0
    try:
        async for chunk in dst.iter_body(message.id):
            check = zlib.crc32(chunk, check)
    except SpoolError as e:
        return f"body unreadable in the destination: {e}"
    if check != crc:
        return "body differs in the destination"
    return None
