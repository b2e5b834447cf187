"""The embedded spool: one SQLite database in the data directory (WAL, synchronous=FULL).

One writer thread owns the write connection and commits in groups: every write waiting at that moment
(puts, claims, outcomes, operator actions) runs in one transaction, each inside its own SAVEPOINT so a
failing one is undone alone, and one fsync makes them all durable before their futures are resolved.
Readers use a small pool of separate connections in worker threads; WAL keeps them off the writer's way.
Bodies live in the database (streamed in and out with incremental blob I/O) with a CRC-32 in the
message row; a damaged entry is set aside as corrupt, never raised past the caller as a crash.
SQLITE_FULL/ENOSPC -> SpoolFullError; busy past the timeout or any other database error ->
SpoolUnavailable. Another process (the CLI) may open the same directory while `serve` runs.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import heapq
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from backupmx.clock import Clock, SystemClock
from backupmx.errors import LeaseLost, NotFound, SpoolError, SpoolFullError, SpoolUnavailable
from backupmx.model import (
    Bounced,
    Delivered,
    Envelope,
    MessageRecord,
    QueueId,
    RecipientRecord,
    RecipientState,
    new_queue_id,
)
from backupmx.spool import (
    KV_LIST_MAX,
    BodyBuffer,
    Claim,
    DomainStats,
    KvItem,
    NewMessage,
    OutagePeriod,
    QueueFilter,
    RecipientUpdate,
    SpoolStatistics,
    SpoolStats,
)
from backupmx.spool.faults import fault_point
from backupmx.spool.records import crc_text, message_record, rcpt_record
from backupmx.spool.schema import migrate

log = logging.getLogger("backupmx.spool")

T = TypeVar("T")

DB_NAME = "spool.db"
MAX_GROUP = 256  # operations per transaction; more wait for the next group
READ_POOL = 4  # idle reader connections kept open
WRITER_CACHE_KIB = 4096  # page cache of the write connection
LIST_CORRUPT_LIMIT = 10_000
WHOLE_BODY_MAX = 1 << 20  # read_body reads bodies up to this size in one go
SHRINK_ABOVE = 4 << 20  # iter_body frees the reader's page cache after each chunk of a larger body
UPDATE_CHUNK = 2_000  # recipients per transaction in operator-wide updates (hold all, flush...)
_DEFAULT_FILTER = QueueFilter()
_PENDING = ("queued", "held")

_MSG_COLS = "id, sender, kind, size, received_at, envelope_json, corrupt_reason"
_MSG_COLS_M = ", ".join(f"m.{c.strip()}" for c in _MSG_COLS.split(","))
_RCPT_COLS = (
    "message_id, idx, address, domain, state, attempts, next_attempt_at, last_attempt_at, "
    "last_reply, held_reason, notify, orcpt, delay_notified, updated_at"
)


# --- errors -----------------------------------------------------------------------------------------
def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and (code & 0xFF) == sqlite3.SQLITE_FULL:
            return True
        return "database or disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def map_error(exc: BaseException) -> BaseException:
    """Foreign exceptions become ours, once, here."""
    if isinstance(exc, SpoolError):
        return exc
    if _is_full(exc):
        return SpoolFullError(f"spool full: {exc}")
    if isinstance(exc, sqlite3.IntegrityError):
        return SpoolError(f"spool integrity: {exc}")
    if isinstance(exc, sqlite3.Error | OSError):
        return SpoolUnavailable(f"spool unavailable: {exc}")
    return exc


# --- the writer ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[Any] | None
    puts: int = 0  # messages this operation stores (a put: 1; a record: its DSNs)


_STOP = object()


def _resolve(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class _Writer:
    """The thread that owns the write connection and commits in groups."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._conn: sqlite3.Connection | None = None
        self._queue: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="backupmx-spool-writer", daemon=True)
        self._lock = threading.Lock()
        self.commits = 0
        self.groups = 0
        self.operations = 0
        self.puts = 0
        self.failed = 0
        self.largest_group = 0
        self.split_groups = 0

    def start(self) -> None:
        self._conn = self._connect()
        self._thread.start()

    def submit(self, op: _Op) -> None:
        self._queue.put(op)

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                break
            assert isinstance(item, _Op)
            group = [item]
            while len(group) < MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                assert isinstance(nxt, _Op)
                group.append(nxt)
            try:
                self._run_group(group)
            except BaseException as exc:  # never let the writer die with callers waiting
                log.exception("spool writer: unexpected failure")
                self._reset_conn()  # closing rolls back whatever the group had begun
                for op in group:
                    self._finish(op, False, map_error(exc))
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _ensure_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _reset_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
        self._conn = None

    def _run_group(self, group: list[_Op]) -> None:
        with self._lock:
            self.groups += 1
            self.largest_group = max(self.largest_group, len(group))
        try:
            conn = self._ensure_conn()
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._reset_conn()
            for op in group:
                self._finish(op, False, map_error(exc))
            return
        results: list[tuple[bool, Any]] = []
        for i, op in enumerate(group):
            conn.execute("SAVEPOINT op")
            try:
                value = op.fn(conn)
            except Exception as exc:
                if not conn.in_transaction:
                    # SQLite gave up the whole transaction (FULL, IOERR, BUSY...): the others are
                    # undone too, so this one fails and the rest run again without it.
                    self._finish(op, False, map_error(exc))
                    with self._lock:
                        self.split_groups += 1
                    rest = group[:i] + group[i + 1 :]
                    if rest:
                        self._run_group(rest)
                    return
                try:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                except sqlite3.Error:
                    self._abort(conn)
                    self._finish(op, False, map_error(exc))
                    rest = group[:i] + group[i + 1 :]
                    if rest:
                        self._run_group(rest)
                    return
                results.append((False, map_error(exc)))
            else:
                conn.execute("RELEASE op")
                results.append((True, value))
        has_put = any(op.puts and ok for op, (ok, _) in zip(group, results, strict=True))
        if has_put:
            fault_point("spool.before_commit")
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._abort(conn)
            if len(group) > 1:
                # One commit for all failed (often SQLITE_FULL while writing the WAL): give each its
                # own chance, so a large message does not take the small ones down with it.
                with self._lock:
                    self.split_groups += 1
                for op in group:
                    self._run_group([op])
            else:
                self._finish(group[0], False, map_error(exc))
            return
        with self._lock:
            self.commits += 1
        if has_put:
            fault_point("spool.after_commit")
        for op, (ok, value) in zip(group, results, strict=True):
            self._finish(op, ok, value)

    def _abort(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._reset_conn()

    def _finish(self, op: _Op, ok: bool, value: Any) -> None:
        with self._lock:
            self.operations += 1
            if ok:
                self.puts += op.puts
            if not ok:
                self.failed += 1
        if op.future is None or op.loop is None:
            return
        try:
            op.loop.call_soon_threadsafe(_resolve, op.future, ok, value)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more


# --- rows -> records ------------------------------------------------------------------------------------
def _load_message(conn: sqlite3.Connection, row: sqlite3.Row) -> tuple[MessageRecord, str | None]:
    """The record of one message row; the second value is why its envelope is unreadable, if it is."""
    rcpts = tuple(
        rcpt_record(r)
        for r in conn.execute(f"SELECT {_RCPT_COLS} FROM recipients WHERE message_id = ? ORDER BY idx", (row["id"],))
    )
    return message_record(row, rcpts)


def _body_chunks(body: BodyBuffer) -> Iterator[bytes]:
    return body.chunks()


# --- write operations (run in the writer thread, inside a savepoint) -----------------------------------
def _insert_message(
    conn: sqlite3.Connection,
    qid: QueueId,
    envelope: Envelope,
    size: int,
    chunks: Iterable[bytes],
    now: float,
    recipients: Sequence[RecipientRecord] | None = None,
) -> None:
    """Store one message. `recipients` (an exact import) keeps their states; None queues every
    recipient of the envelope, due at `now`."""
    if recipients is not None and conn.execute("SELECT 1 FROM messages WHERE id = ?", (qid,)).fetchone():
        raise SpoolError(f"queue ID {qid} is already taken")
    cur = conn.execute("INSERT INTO bodies(message_id, data) VALUES (?, zeroblob(?))", (qid, size))
    rowid = cur.lastrowid
    assert rowid is not None
    crc = 0
    written = 0
    if size:
        with conn.blobopen("bodies", "data", rowid) as blob:
            for chunk in chunks:
                if written + len(chunk) > size:
                    raise SpoolError(f"body of {qid} is longer than its declared size {size}")
                blob.write(chunk)
                crc = zlib.crc32(chunk, crc)
                written += len(chunk)
    if written != size:
        raise SpoolError(f"body of {qid} is {written} bytes, declared {size}")
    if recipients is not None:
        _insert_record(conn, qid, envelope, size, crc, now, recipients)
        return
    conn.execute(
        "INSERT INTO messages(id, sender, kind, size, received_at, envelope_json, checksum, pending, finished_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            qid,
            envelope.sender,
            envelope.kind.value,
            size,
            now,
            json.dumps(envelope.to_json()),
            crc_text(crc),
            1 if envelope.recipients else 0,
            None if envelope.recipients else now,
        ),
    )
    conn.executemany(
        "INSERT INTO recipients(message_id, idx, address, domain, state, next_attempt_at, notify, orcpt,"
        " updated_at) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
        [
            (qid, i, r.address, r.domain, now, ",".join(r.notify) if r.notify else None, r.orcpt, now)
            for i, r in enumerate(envelope.recipients)
        ],
    )


def _insert_record(
    conn: sqlite3.Connection,
    qid: QueueId,
    envelope: Envelope,
    size: int,
    crc: int,
    received_at: float,
    recipients: Sequence[RecipientRecord],
) -> None:
    """The message and recipient rows of an exact import (the body is already in). The triggers count
    the recipients by state; `pending` and `finished_at` are set here, as the state updates would."""
    pending = any(r.state.value in _PENDING for r in recipients)
    finished_at = None if pending else max((r.updated_at for r in recipients), default=received_at)
    conn.execute(
        "INSERT INTO messages(id, sender, kind, size, received_at, envelope_json, checksum, pending, finished_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            qid,
            envelope.sender,
            envelope.kind.value,
            size,
            received_at,
            json.dumps(envelope.to_json()),
            crc_text(crc),
            1 if pending else 0,
            finished_at,
        ),
    )
    conn.executemany(
        f"INSERT INTO recipients({_RCPT_COLS}) VALUES ({', '.join('?' * 14)})",
        [
            (
                qid,
                r.index,
                r.address,
                r.domain,
                r.state.value,
                r.attempts,
                r.next_attempt_at,
                r.last_attempt_at,
                r.last_reply,
                r.held_reason,
                ",".join(r.notify) if r.notify else None,
                r.orcpt,
                1 if r.delay_notified else 0,
                r.updated_at,
            )
            for r in recipients
        ],
    )


def _mark_corrupt(conn: sqlite3.Connection, qid: str, reason: str, now: float) -> None:
    conn.execute(
        "UPDATE messages SET corrupt_reason = ?, corrupt_at = ? WHERE id = ? AND corrupt_reason IS NULL",
        (reason, now, qid),
    )
    log.error("spool: set aside %s as corrupt: %s", qid, reason)


@dataclass(frozen=True, slots=True)
class _DueRow:
    next_attempt_at: float
    message_id: str
    idx: int


SMALL_DOMAIN = 100  # queued recipients at most for a domain to share the claim's one query for small domains


def _due_rows(
    conn: sqlite3.Connection, now: float, limit: int, domains: Sequence[str] | None, exclude: Sequence[str]
) -> list[_DueRow]:
    """Up to `limit` due, unleased QUEUED recipients of sound messages, most overdue (then oldest) first."""
    cond = (
        "r.state = 'queued' AND r.next_attempt_at <= :now"
        " AND (r.lease_until IS NULL OR r.lease_until <= :now)"
        " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = r.message_id"
        " AND m.corrupt_reason IS NOT NULL)"
    )
    if domains is None and not exclude:
        sql = (
            f"SELECT r.next_attempt_at, r.message_id, r.idx FROM recipients r INDEXED BY rcpt_due"
            f" WHERE {cond} ORDER BY r.next_attempt_at, r.message_id LIMIT :limit"
        )
        return [_DueRow(*row) for row in conn.execute(sql, {"now": now, "limit": limit})]
    small: list[str] = []
    if domains is None:
        excluded = {d.lower() for d in exclude}
        big: list[str] = []
        for domain, n in conn.execute("SELECT domain, n FROM rcpt_counts WHERE state = 'queued' AND n > 0"):
            if domain not in excluded:
                (small if n <= SMALL_DOMAIN else big).append(domain)
        domains = big
    # One bounded, index-ordered query per large domain, merged: a large excluded (DOWN) domain is never
    # scanned. The many small ones (DSNs to senders' domains) share one query: a claim never runs one
    # query per queued domain; that query reads at most SMALL_DOMAIN rows of each.
    sql = (
        f"SELECT r.next_attempt_at, r.message_id, r.idx FROM recipients r INDEXED BY rcpt_domain_due"
        f" WHERE r.domain = :domain AND {cond} ORDER BY r.next_attempt_at, r.message_id LIMIT :limit"
    )
    per_domain = [
        [_DueRow(*row) for row in conn.execute(sql, {"now": now, "limit": limit, "domain": d.lower()})]
        for d in dict.fromkeys(domains)
    ]
    if small:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS claim_domains (domain TEXT PRIMARY KEY) WITHOUT ROWID")
        conn.execute("DELETE FROM claim_domains")
        conn.executemany("INSERT OR IGNORE INTO claim_domains (domain) VALUES (?)", [(d,) for d in small])
        rows = conn.execute(
            f"SELECT r.next_attempt_at, r.message_id, r.idx FROM claim_domains c"
            f" JOIN recipients r INDEXED BY rcpt_domain_due ON r.domain = c.domain AND {cond}"
            f" ORDER BY r.next_attempt_at, r.message_id LIMIT :limit",
            {"now": now, "limit": limit},
        )
        per_domain.append([_DueRow(*row) for row in rows])
    merged = heapq.merge(*per_domain, key=lambda r: (r.next_attempt_at, r.message_id, r.idx))
    return [r for _, r in zip(range(limit), merged, strict=False)]


# --- the spool --------------------------------------------------------------------------------------------
class SqliteSpool:
    """The Spool contract on one SQLite file: `data_dir/spool.db`, body buffers in `data_dir/tmp`."""

    def __init__(
        self, data_dir: Path, *, node: str = "local", clock: Clock | None = None, busy_timeout: float = 5.0
    ) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_NAME
        self.tmp_dir = self.data_dir / "tmp"
        self.node = node
        self.clock: Clock = clock or SystemClock()
        self.busy_timeout = busy_timeout
        self._writer: _Writer | None = None
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._open_lock = asyncio.Lock()

    # -- connections -------------------------------------------------------------------------------------
    def _connect(self, *, readonly: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = OFF")
        # Savepoint and statement journals in memory: on disk they cost ~15 writes per put. Every
        # write is bounded (chunked operator updates), so these journals stay small.
        conn.execute("PRAGMA temp_store = MEMORY")
        if readonly:
            conn.execute("PRAGMA query_only = 1")
            conn.execute("PRAGMA cache_size = -8192")
        else:
            # 4 MiB: the writer's cache is filled by every body it writes (a 50 MiB message took the
            # whole 32 MiB it had); index pages of a million-message queue work as well with this.
            conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
            conn.execute("PRAGMA journal_size_limit = 67108864")
        return conn

    def _open_sync(self) -> None:
        # Mail is private: the directories 0700 when we create them, the database 0600 (SQLite gives
        # its -wal and -shm files the database's mode).
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            pass
        # Switching to WAL and migrating can meet SQLITE_BUSY without SQLite's busy handler being
        # called (a journal-mode change, or a read lock upgraded to a write lock, while another process
        # opens the same spool at the same moment): retry, bounded by the busy timeout.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                self._prepare_schema()
                break
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        _fsync_dir(self.data_dir)
        writer = _Writer(self._connect)
        writer.start()
        self._writer = writer

    def _prepare_schema(self) -> None:
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise SpoolUnavailable(f"{self.path}: cannot switch to WAL (journal_mode={mode})")
            migrate(conn)
        finally:
            conn.close()

    async def open(self) -> None:
        async with self._open_lock:
            if self._writer is not None:
                return
            try:
                await asyncio.to_thread(self._open_sync)
            except Exception as exc:
                raise map_error(exc) from exc

    async def close(self) -> None:
        async with self._open_lock:
            writer, self._writer = self._writer, None
            if writer is not None:
                await asyncio.to_thread(writer.stop)
            while True:
                try:
                    conn = self._readers.get_nowait()
                except queue.Empty:
                    break
                conn.close()

    def statistics(self) -> SpoolStatistics:
        w = self._writer
        if w is None:
            return SpoolStatistics()
        with w._lock:
            return SpoolStatistics(
                commits=w.commits,
                groups=w.groups,
                operations=w.operations,
                puts=w.puts,
                failed_operations=w.failed,
                largest_group=w.largest_group,
                split_groups=w.split_groups,
            )

    # -- plumbing ------------------------------------------------------------------------------------------
    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, puts: int = 0) -> T:
        writer = self._writer
        if writer is None:
            raise SpoolUnavailable("spool is not open")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        writer.submit(_Op(fn, loop, fut, puts))
        return await fut

    def _read_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = self._connect(readonly=True)
        ok = False
        try:
            conn.execute("BEGIN")  # one snapshot for the whole read
            try:
                result = fn(conn)
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
            ok = True
            return result
        except Exception as exc:
            raise map_error(exc) from exc
        finally:
            if ok and self._readers.qsize() < READ_POOL and self._writer is not None:
                self._readers.put(conn)
            else:
                conn.close()

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise SpoolUnavailable("spool is not open")
        return await asyncio.to_thread(self._read_sync, fn)

    def _now(self, now: float | None) -> float:
        return self.clock.now() if now is None else now

    async def _set_aside(self, problems: Sequence[tuple[str, str]]) -> None:
        if not problems:
            return
        now = self.clock.now()

        def op(conn: sqlite3.Connection) -> None:
            for qid, reason in problems:
                _mark_corrupt(conn, qid, reason, now)

        try:
            await self._write(op)
        except SpoolError:
            log.exception("spool: could not set aside corrupt entries")

    # -- accept path -----------------------------------------------------------------------------------------
    async def put(self, envelope: Envelope, body: BodyBuffer, *, now: float | None = None) -> QueueId:
        t = self._now(now)
        return await self.put_with_id(new_queue_id(t), envelope, body, now=t)

    async def put_with_id(
        self, queue_id: QueueId, envelope: Envelope, body: BodyBuffer, *, now: float | None = None
    ) -> QueueId:
        t = self._now(now)
        size = body.size

        def op(conn: sqlite3.Connection) -> QueueId:
            _insert_message(conn, queue_id, envelope, size, _body_chunks(body), t)
            return queue_id

        return await self._write(op, puts=1)

    async def put_record(self, message: MessageRecord, body: BodyBuffer) -> None:
        """Import a message exactly as another spool holds it (ID, arrival, every recipient's state,
        attempts and replies), for `backupmx spool copy`. Leases are not carried over."""
        if body.size != message.size:
            raise SpoolError(f"{message.id}: body is {body.size} bytes, the record says {message.size}")
        size = body.size

        def op(conn: sqlite3.Connection) -> None:
            _insert_message(
                conn, message.id, message.envelope, size, _body_chunks(body), message.received_at, message.recipients
            )

        await self._write(op, puts=1)

    # -- delivery path ---------------------------------------------------------------------------------------
    async def claim_due(
        self,
        *,
        now: float,
        owner: str,
        lease_seconds: float,
        limit: int,
        domains: Sequence[str] | None = None,
        exclude_domains: Sequence[str] = (),
    ) -> list[Claim]:
        if limit <= 0 or (domains is not None and not domains):
            return []
        until = now + lease_seconds

        def op(conn: sqlite3.Connection) -> list[Claim]:
            rows = _due_rows(conn, now, limit, domains, exclude_domains)
            by_message: dict[str, list[int]] = {}
            for r in rows:
                by_message.setdefault(r.message_id, []).append(r.idx)
            claims: list[Claim] = []
            for qid, idxs in by_message.items():
                mrow = conn.execute(f"SELECT {_MSG_COLS} FROM messages WHERE id = ?", (qid,)).fetchone()
                if mrow is None:
                    continue  # recipients without a message: cannot happen, but never crash on it
                record, problem = _load_message(conn, mrow)
                if problem is not None:
                    _mark_corrupt(conn, qid, problem, now)
                    continue
                conn.executemany(
                    "UPDATE recipients SET lease_owner = ?, lease_until = ? WHERE message_id = ? AND idx = ?",
                    [(owner, until, qid, i) for i in idxs],
                )
                wanted = set(idxs)
                claimed = tuple(r for r in record.recipients if r.index in wanted)
                claims.append(Claim(message=record, recipients=claimed, owner=owner, lease_until=until))
            return claims

        return await self._write(op)

    async def renew(self, claims: Sequence[Claim], *, now: float, lease_seconds: float) -> None:
        keys = [(c.owner, r.message_id, r.index) for c in claims for r in c.recipients]
        until = now + lease_seconds

        def op(conn: sqlite3.Connection) -> None:
            for owner, qid, idx in keys:
                row = conn.execute(
                    "SELECT lease_owner FROM recipients WHERE message_id = ? AND idx = ?", (qid, idx)
                ).fetchone()
                if row is None or row[0] != owner:
                    raise LeaseLost(f"{qid}[{idx}]: lease no longer held by {owner}")
            conn.executemany(
                "UPDATE recipients SET lease_until = ? WHERE message_id = ? AND idx = ? AND lease_owner = ?",
                [(until, qid, idx, owner) for owner, qid, idx in keys],
            )

        await self._write(op)

    async def claim_held(
        self, message_id: QueueId, *, reason: str, owner: str, lease_seconds: float, now: float
    ) -> Claim | None:
        until = now + lease_seconds

        def op(conn: sqlite3.Connection) -> Claim | None:
            idxs = [
                r[0]
                for r in conn.execute(
                    "SELECT idx FROM recipients WHERE message_id = ? AND +state = 'held' AND held_reason = ?"
                    " AND (lease_until IS NULL OR lease_until <= ?)",
                    (message_id, reason, now),
                )
            ]
            mrow = conn.execute(f"SELECT {_MSG_COLS} FROM messages WHERE id = ?", (message_id,)).fetchone()
            if not idxs or mrow is None:
                return None
            record, problem = _load_message(conn, mrow)
            if problem is not None:
                _mark_corrupt(conn, message_id, problem, now)
                return None
            conn.executemany(
                "UPDATE recipients SET lease_owner = ?, lease_until = ? WHERE message_id = ? AND idx = ?",
                [(owner, until, message_id, i) for i in idxs],
            )
            wanted = set(idxs)
            return Claim(record, tuple(r for r in record.recipients if r.index in wanted), owner, until)

        return await self._write(op)

    async def release(self, claims: Sequence[Claim], *, due: Sequence[float] | None = None) -> None:
        if due is not None and len(due) != len(claims):
            raise SpoolError("release: due must be aligned with claims")
        keys = [
            (c.owner, r.message_id, r.index, None if due is None else due[n])
            for n, c in enumerate(claims)
            for r in c.recipients
        ]
        if not keys:
            return

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE recipients SET lease_owner = NULL, lease_until = NULL,"
                " next_attempt_at = coalesce(?, next_attempt_at)"
                " WHERE message_id = ? AND idx = ? AND lease_owner = ?",
                [(at, qid, idx, owner) for owner, qid, idx, at in keys],
            )

        await self._write(op)

    async def record(
        self, owner: str, updates: Sequence[RecipientUpdate], new_messages: Sequence[NewMessage] = (), *, now: float
    ) -> list[QueueId]:
        updates = list(updates)
        new_messages = list(new_messages)

        def op(conn: sqlite3.Connection) -> list[QueueId]:
            for u in updates:
                row = conn.execute(
                    "SELECT state, lease_owner, held_reason FROM recipients WHERE message_id = ? AND idx = ?",
                    (u.message_id, u.index),
                ).fetchone()
                if row is None or row["lease_owner"] != owner:
                    raise LeaseLost(f"{u.message_id}[{u.index}]: lease no longer held by {owner}")
                current = RecipientState(row["state"])
                state, held_reason, next_at = _outcome_state(u, current, row["held_reason"])
                sets = [
                    "state = :state",
                    "held_reason = :held",
                    "lease_owner = NULL",
                    "lease_until = NULL",
                    "updated_at = :now",
                ]
                params: dict[str, Any] = {
                    "state": state.value,
                    "held": held_reason,
                    "now": now,
                    "qid": u.message_id,
                    "idx": u.index,
                }
                if next_at is not None:
                    sets.append("next_attempt_at = :next")
                    params["next"] = next_at
                if u.outcome is not None:
                    sets += ["attempts = attempts + 1", "last_attempt_at = :now", "last_reply = :reply"]
                    params["reply"] = str(u.outcome.reply)
                if u.delay_notified:
                    sets.append("delay_notified = 1")
                conn.execute(f"UPDATE recipients SET {', '.join(sets)} WHERE message_id = :qid AND idx = :idx", params)
            ids: list[QueueId] = []
            for m in new_messages:
                qid = new_queue_id(now)
                _insert_message(conn, qid, m.envelope, len(m.body), (m.body,), now)
                ids.append(qid)
            return ids

        return await self._write(op, puts=len(new_messages))

    async def read_body(self, message_id: QueueId) -> bytes:
        # An ordinary body in one read (one thread hop, one snapshot) instead of two or more: this is
        # on the delivery path of every message. Anything unusual (missing, corrupt, large, damaged)
        # goes the streaming way, which sets aside and raises exactly as before.
        def whole(conn: sqlite3.Connection) -> bytes | None:
            meta = conn.execute(
                "SELECT size, checksum, corrupt_reason FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            if meta is None or meta["corrupt_reason"] is not None or int(meta["size"]) > WHOLE_BODY_MAX:
                return None
            row = conn.execute("SELECT data FROM bodies WHERE message_id = ?", (message_id,)).fetchone()
            if row is None or len(row[0]) != int(meta["size"]) or crc_text(zlib.crc32(row[0])) != meta["checksum"]:
                return None
            return bytes(row[0])

        data = await self._read(whole)
        if data is not None:
            return data
        return b"".join([chunk async for chunk in self.iter_body(message_id)])

    async def iter_body(self, message_id: QueueId, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Chunks of the stored body. The checksum is known only at the end: a damaged body raises
        SpoolError after its last chunk, so a relay must send the final "." only once this iterator
        has finished without error."""
        meta = await self._read(
            lambda c: c.execute(
                "SELECT size, checksum, corrupt_reason FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
        )
        if meta is None:
            raise NotFound(f"no message {message_id}")
        if meta["corrupt_reason"] is not None:
            raise SpoolError(f"{message_id} is set aside as corrupt: {meta['corrupt_reason']}")
        size, expected = int(meta["size"]), str(meta["checksum"])
        crc, offset = 0, 0

        def chunk_at(conn: sqlite3.Connection, start: int) -> bytes | None:
            row = conn.execute("SELECT rowid, length(data) FROM bodies WHERE message_id = ?", (message_id,)).fetchone()
            if row is None:
                return None
            if row[1] != size:
                raise _BodyDamaged(f"body is {row[1]} bytes, expected {size}")
            with conn.blobopen("bodies", "data", row[0], readonly=True) as blob:
                blob.seek(start)
                data = blob.read(min(chunk_size, size - start))
            if size > SHRINK_ABOVE:
                # a body larger than the reader's page cache only thrashes it (each blob seek walks
                # the overflow pages from the start): hand the pages back, so that 20 streams of
                # 50 MB messages do not keep every reader connection's cache full of body pages
                conn.execute("PRAGMA shrink_memory")
            return data

        while True:
            if offset >= size and offset > 0:
                break
            try:
                chunk = await self._read(functools.partial(chunk_at, start=offset))
            except _BodyDamaged as exc:
                await self._set_aside([(message_id, str(exc))])
                raise SpoolError(f"{message_id}: {exc}") from None
            if chunk is None:
                if offset == 0 and await self._exists(message_id):
                    await self._set_aside([(message_id, "body missing")])
                    raise SpoolError(f"{message_id}: body missing")
                raise NotFound(f"no message {message_id}")
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            offset += len(chunk)
            yield chunk
        if crc_text(crc) != expected:
            reason = f"body checksum mismatch: stored {expected}, computed {crc_text(crc)}"
            await self._set_aside([(message_id, reason)])
            raise SpoolError(f"{message_id}: {reason}")

    async def _exists(self, message_id: QueueId) -> bool:
        row = await self._read(lambda c: c.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,)).fetchone())
        return row is not None

    async def next_due_at(self, *, domains: Sequence[str] | None = None) -> float | None:
        now = self.clock.now()

        def fn(conn: sqlite3.Connection) -> float | None:
            doms = None if domains is None else list(dict.fromkeys(d.lower() for d in domains))
            candidates: list[float] = []
            # Unleased (or lease run out): the first in next_attempt_at order. Leased rows are skipped
            # in index order; there are few (bounded by the nodes' active windows).
            unleased = "(lease_until IS NULL OR lease_until <= ?)"
            if doms is None:
                row = conn.execute(
                    "SELECT next_attempt_at FROM recipients INDEXED BY rcpt_due WHERE state = 'queued'"
                    f" AND {unleased} ORDER BY next_attempt_at LIMIT 1",
                    (now,),
                ).fetchone()
                candidates += [row[0]] if row else []
            else:
                for d in doms:
                    row = conn.execute(
                        "SELECT next_attempt_at FROM recipients INDEXED BY rcpt_domain_due WHERE domain = ?"
                        f" AND state = 'queued' AND {unleased} ORDER BY next_attempt_at LIMIT 1",
                        (d, now),
                    ).fetchone()
                    candidates += [row[0]] if row else []
            # Leased: due again when the lease runs out (if no outcome is recorded before).
            where_dom, params = "", []
            if doms is not None:
                where_dom = f" AND domain IN ({','.join('?' * len(doms))})"
                params = doms
            row = conn.execute(
                "SELECT min(max(next_attempt_at, lease_until)) FROM recipients INDEXED BY rcpt_leased"
                " WHERE lease_until > ? AND state = 'queued'" + where_dom,
                [now, *params],
            ).fetchone()
            if row[0] is not None:
                candidates.append(row[0])
            return min(candidates, default=None)

        return await self._read(fn)

    # -- operator actions ---------------------------------------------------------------------------------
    async def _update_recipients(
        self, sets: str, set_params: Sequence[Any], where: str, where_params: Sequence[Any]
    ) -> int:
        """UPDATE recipients in bounded chunks, each its own write: holding a million recipients never
        makes one huge transaction (memory, WAL) nor keeps puts waiting behind it."""
        sql = (
            f"UPDATE recipients SET {sets} WHERE (message_id, idx) IN"
            f" (SELECT message_id, idx FROM recipients WHERE {where} LIMIT {UPDATE_CHUNK})"
        )
        params = [*set_params, *where_params]

        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, params).rowcount

        total = 0
        while True:
            n = await self._write(op)
            total += n
            if n < UPDATE_CHUNK:
                return total

    async def hold(
        self,
        message_id: QueueId | None,
        *,
        reason: str = "operator",
        domain: str | None = None,
        now: float | None = None,
    ) -> int:
        t = self._now(now)
        where, params = _target("queued", message_id, domain)
        return await self._update_recipients(
            "state = 'held', held_reason = ?, updated_at = ?", [reason, t], where, params
        )

    async def release_held(
        self,
        message_id: QueueId | None,
        *,
        domain: str | None = None,
        reason: str | None = None,
        now: float | None = None,
    ) -> int:
        t = self._now(now)
        where, params = _target("held", message_id, domain)
        if reason is not None:
            where += " AND held_reason = ?"
            params.append(reason)
        return await self._update_recipients(
            "state = 'queued', held_reason = NULL, next_attempt_at = ?, updated_at = ?", [t, t], where, params
        )

    async def delete(self, message_id: QueueId) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM recipients WHERE message_id = ?", (message_id,))
            conn.execute("DELETE FROM bodies WHERE message_id = ?", (message_id,))
            return conn.execute("DELETE FROM messages WHERE id = ?", (message_id,)).rowcount > 0

        return await self._write(op)

    async def flush(self, domain: str | None = None, *, now: float | None = None) -> int:
        t = self._now(now)
        where, params = _target("queued", None, domain)
        return await self._update_recipients(
            "next_attempt_at = ?, updated_at = ?", [t, t], f"{where} AND next_attempt_at > ?", [*params, t]
        )

    async def purge(self, *, before: float, limit: int = 10_000) -> int:
        """Delete up to `limit` finished messages (every recipient delivered/bounced/expired) whose last
        change is older than `before`, and expired shared state (kv). Returns how many were deleted."""
        now = self.clock.now()

        def op(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM kv WHERE expires_at <= ?", (now,))
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM messages INDEXED BY messages_finished WHERE pending = 0 AND finished_at < ?"
                    " AND corrupt_reason IS NULL ORDER BY finished_at LIMIT ?",
                    (before, limit),
                )
            ]
            for qid in ids:
                conn.execute("DELETE FROM recipients WHERE message_id = ?", (qid,))
                conn.execute("DELETE FROM bodies WHERE message_id = ?", (qid,))
                conn.execute("DELETE FROM messages WHERE id = ?", (qid,))
            return len(ids)

        return await self._write(op)

    # -- reading ---------------------------------------------------------------------------------------------
    async def get(self, message_id: QueueId) -> MessageRecord | None:
        def fn(conn: sqlite3.Connection) -> tuple[MessageRecord, str | None] | None:
            row = conn.execute(f"SELECT {_MSG_COLS} FROM messages WHERE id = ?", (message_id,)).fetchone()
            return None if row is None else _load_message(conn, row)

        found = await self._read(fn)
        if found is None:
            return None
        record, problem = found
        if problem is not None:
            await self._set_aside([(message_id, problem)])
        return record

    async def list_messages(
        self, flt: QueueFilter = _DEFAULT_FILTER, *, limit: int = 100, after: QueueId | None = None
    ) -> list[MessageRecord]:
        # Message-level conditions, on m.
        mwhere: list[str] = []
        mparams: list[Any] = []
        if flt.pending_only:
            mwhere.append("m.pending = 1")
        if flt.kind is not None:
            mwhere.append("m.kind = ?")
            mparams.append(str(flt.kind))
        if flt.sender is not None:
            mwhere.append("instr(lower(m.sender), ?) > 0")
            mparams.append(flt.sender.lower())
        # Recipient-level conditions, all on the same recipient r.
        rwhere: list[str] = []
        rparams: list[Any] = []
        if flt.domain is not None:
            rwhere.append("+r.domain = ?")
            rparams.append(flt.domain.lower())
        if flt.recipient is not None:
            rwhere.append("instr(lower(r.address), ?) > 0")
            rparams.append(flt.recipient.lower())
        if flt.state is not None:
            rwhere.append("+r.state = ?")
            rparams.append(RecipientState(flt.state).value)
        if flt.held_reason is not None:
            rwhere.append("+r.state = 'held' AND r.held_reason = ?")
            rparams.append(flt.held_reason)
        lim = max(0, limit)
        held = flt.held_reason is not None or flt.state == RecipientState.HELD
        if flt.domain is not None or held:
            # Page through the matching recipients in message order (an index per case), joining each
            # to its message: cost follows the page, not the queue, however rare the match.
            if flt.domain is not None:
                drive = "INDEXED BY rcpt_domain_msg"
                rwhere[0] = "r.domain = ?"
            else:
                drive = "INDEXED BY rcpt_held"
                rwhere.append("r.state = 'held'")
            where = " AND ".join(["r.message_id > ?", *rwhere, *mwhere])
            sql = (
                f"SELECT {_MSG_COLS_M} FROM recipients r {drive} CROSS JOIN messages m ON m.id = r.message_id"
                f" WHERE {where} GROUP BY r.message_id ORDER BY r.message_id LIMIT ?"
            )
            params = [after or "", *rparams, *mparams, lim]
        else:
            conds = ["m.id > ?", *mwhere]
            if rwhere:
                same = " AND ".join(rwhere)
                conds.append(f"EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id AND {same})")
            index = "INDEXED BY messages_pending" if flt.pending_only else ""
            sql = f"SELECT {_MSG_COLS_M} FROM messages m {index} WHERE {' AND '.join(conds)} ORDER BY m.id LIMIT ?"
            params = [after or "", *mparams, *rparams, lim]

        def fn(conn: sqlite3.Connection) -> list[tuple[MessageRecord, str | None]]:
            rows = conn.execute(sql, params).fetchall()  # one page, bounded by `limit`
            return [_load_message(conn, row) for row in rows]

        loaded = await self._read(fn)
        problems = [(rec.id, p) for rec, p in loaded if p is not None]
        await self._set_aside(problems)
        return [rec for rec, _ in loaded]

    async def count_pending(self, *, include_kinds: Sequence[str] = ("user", "dsn")) -> int:
        kinds = [str(k) for k in include_kinds]
        if not kinds:
            return 0

        def fn(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                f"SELECT coalesce(sum(pending), 0) FROM msg_counts WHERE kind IN ({','.join('?' * len(kinds))})", kinds
            ).fetchone()
            return int(row[0])

        return await self._read(fn)

    async def stats(self) -> SpoolStats:
        def fn(conn: sqlite3.Connection) -> SpoolStats:
            by_state: dict[str, int] = {}
            per_domain: dict[str, dict[str, int]] = {}
            for row in conn.execute("SELECT domain, state, n FROM rcpt_counts WHERE n != 0 ORDER BY domain"):
                per_domain.setdefault(row[0], {})[row[1]] = row[2]
                by_state[row[1]] = by_state.get(row[1], 0) + row[2]
            dom_msgs = {row[0]: row[1] for row in conn.execute("SELECT domain, messages FROM dom_pending")}
            held: dict[str, tuple[dict[str, int], dict[str, float]]] = {}
            if by_state.get("held"):  # the partial index of held recipients: nothing read when none is held
                for row in conn.execute(
                    "SELECT domain, coalesce(held_reason, 'operator'), count(*), min(updated_at)"
                    " FROM recipients INDEXED BY rcpt_held WHERE state = 'held' GROUP BY 1, 2"
                ):
                    n_by, at_by = held.setdefault(row[0], ({}, {}))
                    n_by[row[1]] = int(row[2])
                    at_by[row[1]] = float(row[3])
            domains: list[DomainStats] = []
            for domain, states in per_domain.items():
                oldest_id = conn.execute(
                    "SELECT min(message_id) FROM recipients INDEXED BY rcpt_domain_pending"
                    " WHERE domain = ? AND state IN ('queued','held')",
                    (domain,),
                ).fetchone()[0]
                oldest = None
                if oldest_id is not None:
                    oldest = conn.execute("SELECT received_at FROM messages WHERE id = ?", (oldest_id,)).fetchone()[0]
                held_n, held_at = held.get(domain, ({}, {}))
                domains.append(
                    DomainStats(
                        domain=domain,
                        by_state=states,
                        messages_pending=dom_msgs.get(domain, 0),
                        oldest_pending_at=oldest,
                        held_by_reason=held_n,
                        held_since=held_at,
                    )
                )
            pending = conn.execute("SELECT coalesce(sum(pending), 0) FROM msg_counts").fetchone()[0]
            oldest_row = conn.execute(
                "SELECT received_at FROM messages INDEXED BY messages_pending WHERE pending = 1"
                " AND corrupt_reason IS NULL ORDER BY id LIMIT 1"
            ).fetchone()
            corrupt = conn.execute(
                "SELECT count(*) FROM messages INDEXED BY messages_corrupt WHERE corrupt_reason IS NOT NULL"
            ).fetchone()[0]
            return SpoolStats(
                messages_pending=int(pending),
                recipients_by_state=by_state,
                domains=tuple(domains),
                oldest_pending_at=None if oldest_row is None else oldest_row[0],
                corrupt=int(corrupt),
                bytes_on_disk=self._bytes_on_disk(),
            )

        return await self._read(fn)

    def _bytes_on_disk(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        return total

    async def list_corrupt(self) -> list[tuple[QueueId, str]]:
        def fn(conn: sqlite3.Connection) -> list[tuple[QueueId, str]]:
            return [
                (QueueId(row[0]), str(row[1]))
                for row in conn.execute(
                    "SELECT id, corrupt_reason FROM messages INDEXED BY messages_corrupt"
                    " WHERE corrupt_reason IS NOT NULL ORDER BY id LIMIT ?",
                    (LIST_CORRUPT_LIMIT,),
                )
            ]

        return await self._read(fn)

    async def verify(self, *, after: QueueId | None = None, limit: int = 1000) -> tuple[int, QueueId | None]:
        """Check the body checksums of up to `limit` messages after `after`; damaged ones are set aside.
        Returns (how many were damaged, the last ID checked or None at the end) for the next call."""
        rows = await self._read(
            lambda c: [
                row[0]
                for row in c.execute(
                    "SELECT id FROM messages WHERE id > ? AND corrupt_reason IS NULL ORDER BY id LIMIT ?",
                    (after or "", limit),
                )
            ]
        )
        damaged = 0
        for qid in rows:
            try:
                async for _ in self.iter_body(QueueId(qid)):
                    pass
            except NotFound:
                continue
            except SpoolError:
                damaged += 1
        return damaged, (QueueId(rows[-1]) if len(rows) == limit else None)

    # -- outages -------------------------------------------------------------------------------------------
    async def outage_started(self, domain: str, at: float) -> None:
        d = domain.lower()

        def op(conn: sqlite3.Connection) -> None:
            open_ = conn.execute("SELECT 1 FROM outages WHERE domain = ? AND ended_at IS NULL", (d,)).fetchone()
            if open_ is None:
                conn.execute("INSERT INTO outages(domain, started_at) VALUES (?, ?)", (d, at))

        await self._write(op)

    async def outage_ended(self, domain: str, at: float) -> None:
        d = domain.lower()

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE outages SET ended_at = ? WHERE domain = ? AND ended_at IS NULL", (at, d))

        await self._write(op)

    async def outages(self, domain: str | None = None, *, since: float = 0.0) -> list[OutagePeriod]:
        def fn(conn: sqlite3.Connection) -> list[OutagePeriod]:
            sql = "SELECT domain, started_at, ended_at FROM outages WHERE (ended_at IS NULL OR ended_at >= ?)"
            params: list[Any] = [since]
            if domain is not None:
                sql += " AND domain = ?"
                params.append(domain.lower())
            sql += " ORDER BY started_at, domain LIMIT 100000"
            return [OutagePeriod(row[0], row[1], row[2]) for row in conn.execute(sql, params)]

        return await self._read(fn)

    # -- shared state for the other parts of backupmx --------------------------------------------------------
    async def kv_get(self, namespace: str, key: str) -> bytes | None:
        now = self.clock.now()

        def fn(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT value FROM kv WHERE namespace = ? AND key = ? AND (expires_at IS NULL OR expires_at > ?)",
                (namespace, key, now),
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._read(fn)

    async def kv_put(
        self, namespace: str, key: str, value: bytes, *, expires_at: float | None = None, now: float | None = None
    ) -> None:
        t = self._now(now)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO kv (namespace, key, value, updated_at, updated_by, expires_at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at,"
                " updated_by = excluded.updated_by, expires_at = excluded.expires_at",
                (namespace, key, bytes(value), t, self.node, expires_at),
            )

        await self._write(op)

    async def kv_delete(self, namespace: str, key: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM kv WHERE namespace = ? AND key = ?", (namespace, key)).rowcount > 0

        return await self._write(op)

    async def kv_list(
        self, namespace: str, *, prefix: str = "", after: str | None = None, limit: int = KV_LIST_MAX
    ) -> list[KvItem]:
        """A page of live items of `namespace` whose key starts with `prefix`, in key order after `after`.
        One range of the primary key: from the later of `after` and `prefix` to the end of the prefix."""
        now = self.clock.now()
        lim = max(0, min(limit, KV_LIST_MAX))
        sql = (
            "SELECT namespace, key, value, updated_at, updated_by, expires_at FROM kv"
            " WHERE namespace = ? AND key > ? AND key >= ? AND substr(key, 1, ?) = ?"
            " AND (expires_at IS NULL OR expires_at > ?)"
        )
        params: list[Any] = [namespace, after or "", prefix, len(prefix), prefix, now]
        end = _prefix_end(prefix)
        if end is not None:
            sql += " AND key < ?"
            params.append(end)
        sql += " ORDER BY key LIMIT ?"
        params.append(lim)

        def fn(conn: sqlite3.Connection) -> list[KvItem]:
            return [KvItem(row[0], row[1], bytes(row[2]), row[3], row[4], row[5]) for row in conn.execute(sql, params)]

        return await self._read(fn)


def _prefix_end(prefix: str) -> str | None:
    """The least key greater than every key that starts with `prefix` (SQLite compares text as UTF-8
    bytes, which is code point order); None when there is none to name (no prefix, or it ends in the
    last code point)."""
    if not prefix or ord(prefix[-1]) >= 0x10FFFF:
        return None
    last = ord(prefix[-1]) + 1
    if 0xD800 <= last <= 0xDFFF:  # surrogates are not encodable: step over them
        last = 0xE000
    return prefix[:-1] + chr(last)


class _BodyDamaged(Exception):
    pass


def _target(state: str, message_id: QueueId | None, domain: str | None) -> tuple[str, list[Any]]:
    """WHERE for recipients in `state` of one message and/or one domain. With a message named, the
    other columns get a unary "+" so the planner takes the primary key, not the (domain, state) index."""
    pin = "+" if message_id is not None else ""
    where = f"{pin}state = '{state}'"
    params: list[Any] = []
    if message_id is not None:
        where += " AND message_id = ?"
        params.append(message_id)
    if domain is not None:
        where += f" AND {pin}domain = ?"
        params.append(domain.lower())
    return where, params


def _outcome_state(
    u: RecipientUpdate, current: RecipientState, held_reason: str | None
) -> tuple[RecipientState, str | None, float | None]:
    """(new state, held reason, next_attempt_at or None to keep) for one outcome.

    The mail really went out on Delivered, so that wins over an operator's hold placed during the
    attempt; a Deferred outcome never turns a HELD recipient back into QUEUED."""
    outcome = u.outcome
    if isinstance(outcome, Delivered):
        return RecipientState.DELIVERED, None, None
    if isinstance(outcome, Bounced):
        return RecipientState.BOUNCED, None, None
    if u.expire:
        return RecipientState.EXPIRED, None, None
    if outcome is None:
        raise SpoolError(f"{u.message_id}[{u.index}]: an update needs an outcome or expire=True")
    if outcome.guard_hold:
        return (
            RecipientState.HELD,
            held_reason if current is RecipientState.HELD else "recovery-guard",
            u.next_attempt_at,
        )
    if current is RecipientState.HELD:
        return RecipientState.HELD, held_reason, u.next_attempt_at
    return RecipientState.QUEUED, None, u.next_attempt_at


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["SqliteSpool", "map_error"]
