"""The shared spool: the Spool contract on one PostgreSQL database that every backup MX node uses.

One writer task per node owns one connection and commits in groups: every write waiting at that moment
(puts, claims, outcomes, operator actions) runs in one transaction and one commit (one WAL flush, and
one round to a synchronous standby when there is one) before their futures are resolved. Bodies are
rows of at most 256 KiB in `body_chunks`; a large body is uploaded on a pool connection and committed
first, so it never holds up the small ones nor needs its size in memory. Claims take due recipients
with `FOR UPDATE SKIP LOCKED` under a lease (owner node, expiry); an outcome from a node that no longer
holds the lease is refused with LeaseLost. Readers use a small connection pool.
Failures: an unreachable or failing database -> SpoolUnavailable (451 4.3.0), disk full on the server
-> SpoolFullError (452 4.3.1); nothing of a failed put exists afterwards (a committed-but-unacknowledged
put, when the connection drops inside COMMIT, is a possible duplicate, never a loss).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import asyncpg  # type: ignore[import-untyped]

from backupmx import __version__
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
from backupmx.spool.pg_schema import SCHEMA, migrate
from backupmx.spool.records import crc_text, message_record, rcpt_record

log = logging.getLogger("backupmx.spool")

T = TypeVar("T")
Connection = Any  # asyncpg.Connection (asyncpg ships no type information)

CHUNK = 256 * 1024  # stored body chunk
INLINE_BODY_MAX = 1024 * 1024  # larger bodies are uploaded before their group commit
READ_BATCH = 4  # body chunks fetched per query (1 MiB)
MAX_GROUP = 256  # operations per transaction; more wait for the next group
GROUP_RETRIES = 3  # a group that hit a deadlock or serialization failure is run again
DOWN_BACKOFF = 1.0  # after a failed connect, fail writes at once for this long
UPLOAD_STALE_SECONDS = 3600.0  # uploads older than this belong to a node that died
NODE_SEEN_INTERVAL = 15.0
PURGE_BATCH = 500  # finished messages deleted per write
LIST_CORRUPT_LIMIT = 10_000
_DEFAULT_FILTER = QueueFilter()
_PENDING = (RecipientState.QUEUED.value, RecipientState.HELD.value)

_MSG_COLS = "id, sender, kind, size, received_at, envelope_json, corrupt_reason"
_RCPT_COLS = (
    "message_id, idx, address, domain, state, attempts, next_attempt_at, last_attempt_at, "
    "last_reply, held_reason, notify, orcpt, delay_notified, updated_at"
)


# --- errors ---------------------------------------------------------------------------------------------
_CONNECTION_SQLSTATES = ("08", "57P")  # connection exceptions; admin/crash shutdown, cannot connect now
_RETRY_SQLSTATES = ("40001", "40P01")  # serialization failure, deadlock: run the group again
_OVERLOAD_SQLSTATES = ("57014", "55P03", "53300", "53200")  # statement/lock timeout, too many conns, OOM


def _sqlstate(exc: BaseException) -> str:
    return str(getattr(exc, "sqlstate", "") or "")


def _connection_lost(exc: BaseException) -> bool:
    """True when the connection cannot be used any more (the server went away, or we timed out)."""
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.PostgresConnectionError | OSError | TimeoutError):
        return True
    return _sqlstate(exc).startswith(_CONNECTION_SQLSTATES)


def map_error(exc: BaseException) -> BaseException:
    """Foreign exceptions become ours, once, here."""
    if isinstance(exc, SpoolError):
        return exc
    state = _sqlstate(exc)
    if state == "53100":  # disk_full
        return SpoolFullError(f"spool full (database server): {exc}")
    if state.startswith("23"):
        return SpoolError(f"spool integrity: {exc}")
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError | TimeoutError):
        return SpoolUnavailable(f"spool unavailable: {type(exc).__name__}: {exc}")
    return exc


class _Clean(Exception):
    """An operation failed before writing anything: the group's transaction goes on without it."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


# --- the writer -----------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Op:
    fn: Callable[[Connection], Awaitable[Any]]
    future: asyncio.Future[Any]
    is_put: bool = False


class _Writer:
    """The task that owns this node's write connection and commits in groups."""

    def __init__(self, connect: Callable[[], Awaitable[Connection]]) -> None:
        self._connect = connect
        self._conn: Connection | None = None
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._down_until = 0.0
        self._down_reason = ""
        self.commits = 0
        self.groups = 0
        self.operations = 0
        self.puts = 0
        self.failed = 0
        self.largest_group = 0
        self.split_groups = 0

    def start(self, conn: Connection | None = None) -> None:
        self._conn = conn
        self._task = asyncio.get_running_loop().create_task(self._run(), name="backupmx-spool-writer")

    def submit(self, op: _Op) -> None:
        self._queue.put_nowait(op)

    async def stop(self) -> None:
        """Finish what is queued, then close the connection."""
        self._queue.put_nowait(None)
        if self._task is not None:
            await self._task
        await self._drop_conn()

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            group = [first]
            while len(group) < MAX_GROUP and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stopping = True
                    break
                group.append(nxt)
            # A put whose caller gave up (the SMTP session is gone) must not become a message nobody
            # acknowledged; any other write still runs (an outcome is better recorded than not).
            live = [op for op in group if not (op.is_put and op.future.done())]
            if not live:
                continue
            try:
                await self._run_group(live)
            except Exception as exc:  # never let the writer die with callers waiting
                log.exception("spool writer: unexpected failure")
                for op in live:
                    self._finish(op, False, map_error(exc))

    async def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=2.0)
            except Exception:
                conn.terminate()

    async def _connection(self) -> Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._conn = None
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until:
            raise SpoolUnavailable(f"spool unavailable: database unreachable ({self._down_reason})")
        try:
            self._conn = await self._connect()
        except Exception as exc:
            self._down_until = loop.time() + DOWN_BACKOFF
            self._down_reason = f"{type(exc).__name__}: {exc}"
            raise
        return self._conn

    async def _run_group(self, group: list[_Op]) -> None:
        """Run `group` in one transaction and commit; retried, split or failed as the failure says.
        A loop, not recursion: a group of MAX_GROUP operations that each fail stays shallow."""
        attempt = 0  # deadlock / serialization retries
        fresh = False  # already retried on a new connection
        while group:
            outcome = await self._try_group(group)
            if outcome is None:
                return  # committed (or every operation finished)
            failed_at, failure = outcome
            if _connection_lost(failure) and not fresh and not isinstance(failure, TimeoutError):
                # The connection died while idle (a database restart, a failover, a firewall): nothing of
                # this group was committed, so it runs once more on a new connection.
                fresh = True
                continue
            if _connection_lost(failure) or _sqlstate(failure).startswith(_OVERLOAD_SQLSTATES):
                # The database is away or overloaded: the others would fail the same way.
                for op in group:
                    self._finish(op, False, map_error(failure))
                return
            if _sqlstate(failure) in _RETRY_SQLSTATES and attempt < GROUP_RETRIES:
                attempt += 1
                self.split_groups += 1
                await asyncio.sleep(random.uniform(0.005, 0.05) * attempt)
                continue
            # This operation failed after writing: it fails alone, the rest run again without it.
            self._finish(group[failed_at], False, map_error(failure))
            group = group[:failed_at] + group[failed_at + 1 :]
            if group:
                self.split_groups += 1

    async def _try_group(self, group: list[_Op]) -> tuple[int, BaseException] | None:
        """One transaction for `group`. None when every operation is finished (committed, or failed by a
        commit that cannot be retried); else (index of the operation that failed, its exception), with
        the transaction rolled back and nothing finished."""
        self.groups += 1
        self.largest_group = max(self.largest_group, len(group))
        try:
            conn = await self._connection()
        except Exception as exc:
            for op in group:
                self._finish(op, False, map_error(exc))
            return None
        results: list[tuple[bool, Any]] = []
        tx = conn.transaction()
        try:
            await tx.start()
        except Exception as exc:
            await self._abort(conn, tx, exc)
            return 0, exc
        for i, op in enumerate(group):
            try:
                results.append((True, await op.fn(conn)))
            except _Clean as clean:
                results.append((False, clean.error))
            except Exception as exc:
                await self._abort(conn, tx, exc)
                return i, exc
        has_put = any(op.is_put and ok for op, (ok, _) in zip(group, results, strict=True))
        if has_put:
            fault_point("spool.before_commit")
        try:
            await tx.commit()
        except Exception as exc:
            await self._abort(conn, tx, exc)
            if len(group) > 1 and not _connection_lost(exc):
                self.split_groups += 1
                for op in group:  # each alone: one bad operation does not take the others down
                    await self._run_group([op])
            else:
                # A connection lost inside COMMIT leaves it unknown whether it committed: the callers
                # get an error (451) and a message may exist twice later, but never zero times.
                for op in group:
                    self._finish(op, False, map_error(exc))
            return None
        self.commits += 1
        if has_put:
            fault_point("spool.after_commit")
        for op, (ok, value) in zip(group, results, strict=True):
            self._finish(op, ok, value)
        return None

    async def _abort(self, conn: Connection, tx: Any, exc: BaseException) -> None:
        if _connection_lost(exc):
            await self._drop_conn()
            return
        try:
            await tx.rollback()
        except Exception:
            await self._drop_conn()

    def _finish(self, op: _Op, ok: bool, value: Any) -> None:
        self.operations += 1
        if op.is_put and ok:
            self.puts += 1
        if not ok:
            self.failed += 1
        if op.future.done():
            return
        if ok:
            op.future.set_result(value)
        else:
            op.future.set_exception(value)


# --- rows -> records ------------------------------------------------------------------------------------
async def _load_messages(conn: Connection, mrows: Sequence[Any]) -> list[tuple[MessageRecord, str | None]]:
    """Records for message rows (two queries for any number); the second value is why an envelope is
    unreadable, if it is."""
    if not mrows:
        return []
    ids = [r["id"] for r in mrows]
    by_msg: dict[str, list[RecipientRecord]] = {}
    for r in await conn.fetch(
        f"SELECT {_RCPT_COLS} FROM recipients WHERE message_id = ANY($1::text[]) ORDER BY message_id, idx", ids
    ):
        by_msg.setdefault(r["message_id"], []).append(rcpt_record(r))
    return [message_record(row, tuple(by_msg.get(row["id"], ()))) for row in mrows]


def _count(status: str) -> int:
    """Rows affected, from a command status ("UPDATE 3", "DELETE 0")."""
    try:
        return int(status.rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return 0


# --- write statements -----------------------------------------------------------------------------------
# One round trip stores a whole message: its row, its recipients, its per-domain counts and (when small)
# its body. A taken queue ID inserts nothing at all (inserted = 0).
_INSERT_MESSAGE = """
WITH m AS (
    INSERT INTO messages (id, sender, kind, size, received_at, received_by, envelope_json, checksum, chunks,
                          pending_rcpts, finished_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $28)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), r AS (
    INSERT INTO recipients (message_id, idx, address, domain, state, attempts, next_attempt_at, last_attempt_at,
                            last_reply, held_reason, notify, orcpt, delay_notified, updated_at)
    SELECT m.id, x.* FROM m, unnest($11::int[], $12::text[], $13::text[], $14::text[], $15::int[],
                                    $16::float8[], $17::float8[], $18::text[], $19::text[], $20::text[],
                                    $21::text[], $22::bool[], $23::float8[]) AS x
), d AS (
    INSERT INTO msg_domains (message_id, domain, pending)
    SELECT m.id, y.domain, y.pending FROM m, unnest($24::text[], $25::int[]) AS y(domain, pending)
), b AS (
    INSERT INTO body_chunks (message_id, seq, data)
    SELECT m.id, z.seq - 1, z.data FROM m, unnest($26::bytea[]) WITH ORDINALITY AS z(data, seq)
), u AS (
    DELETE FROM body_uploads WHERE message_id = $1 AND $27 RETURNING 1
)
SELECT (SELECT count(*) FROM m) AS inserted, (SELECT count(*) FROM u) AS uploaded
"""


@dataclass(frozen=True, slots=True)
class _StoredBody:
    size: int
    crc: int
    chunks: int
    inline: list[bytes] | None  # None: already uploaded under the message's ID


def _inline_body(chunks: Iterable[bytes], size: int) -> _StoredBody:
    data: list[bytes] = []
    crc = 0
    written = 0
    for chunk in chunks:
        for start in range(0, len(chunk), CHUNK):
            piece = bytes(chunk[start : start + CHUNK])
            data.append(piece)
            crc = zlib.crc32(piece, crc)
            written += len(piece)
    if written != size:
        raise SpoolError(f"body is {written} bytes, declared {size}")
    return _StoredBody(size=size, crc=crc, chunks=len(data), inline=data)


async def _insert_message(
    conn: Connection,
    qid: str,
    envelope: Envelope,
    body: _StoredBody,
    received_at: float,
    node: str,
    recipients: Sequence[RecipientRecord] | None = None,
) -> None:
    """Store one message in the group's transaction. `recipients` (an exact import) keeps their states;
    None queues every recipient of the envelope, due at `received_at`."""
    if recipients is None:
        recipients = [
            RecipientRecord(
                message_id=QueueId(qid),
                index=i,
                address=r.address,
                domain=r.domain,
                state=RecipientState.QUEUED,
                next_attempt_at=received_at,
                notify=r.notify,
                orcpt=r.orcpt,
                updated_at=received_at,
            )
            for i, r in enumerate(envelope.recipients)
        ]
    per_domain: dict[str, int] = {}
    for r in recipients:
        per_domain[r.domain] = per_domain.get(r.domain, 0) + (1 if r.state.value in _PENDING else 0)
    pending = sum(per_domain.values())
    finished_at = None if pending else max((r.updated_at for r in recipients), default=received_at)
    row = await conn.fetchrow(
        _INSERT_MESSAGE,
        qid,
        envelope.sender,
        envelope.kind.value,
        body.size,
        received_at,
        node,
        json.dumps(envelope.to_json()),
        crc_text(body.crc),
        body.chunks,
        pending,
        [r.index for r in recipients],
        [r.address for r in recipients],
        [r.domain for r in recipients],
        [r.state.value for r in recipients],
        [r.attempts for r in recipients],
        [r.next_attempt_at for r in recipients],
        [r.last_attempt_at for r in recipients],
        [r.last_reply for r in recipients],
        [r.held_reason for r in recipients],
        [",".join(r.notify) if r.notify else None for r in recipients],
        [r.orcpt for r in recipients],
        [r.delay_notified for r in recipients],
        [r.updated_at for r in recipients],
        list(per_domain),
        list(per_domain.values()),
        body.inline or [],
        body.inline is None,
        finished_at,
    )
    if row["inserted"] == 0:
        raise _Clean(SpoolError(f"queue ID {qid} is already taken"))
    if body.inline is None and row["uploaded"] != 1:
        raise SpoolError(f"{qid}: the uploaded body is gone (removed as stale?)")


async def _mark_corrupt(conn: Connection, qid: str, reason: str, now: float) -> None:
    await conn.execute(
        "UPDATE messages SET corrupt_reason = $1, corrupt_at = $2 WHERE id = $3 AND corrupt_reason IS NULL",
        reason,
        now,
        qid,
    )
    log.error("spool: set aside %s as corrupt: %s", qid, reason)


_CLAIM_ANY = """
WITH due AS (
    SELECT r.message_id, r.idx FROM recipients r
    WHERE r.state = 'queued' AND r.next_attempt_at <= $1
      AND (r.lease_until IS NULL OR r.lease_until <= $5)
      AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = r.message_id AND m.corrupt_reason IS NOT NULL)
    ORDER BY r.next_attempt_at, r.message_id, r.idx
    LIMIT $2
    FOR UPDATE OF r SKIP LOCKED
)
UPDATE recipients r SET lease_owner = $3, lease_until = $4
FROM due WHERE r.message_id = due.message_id AND r.idx = due.idx
RETURNING r.message_id, r.idx, r.next_attempt_at
"""

# Per domain, one bounded index-ordered scan, merged: a large excluded (DOWN) domain is never scanned.
_CLAIM_DOMAINS = """
WITH due AS (
    SELECT x.message_id, x.idx, x.next_attempt_at
    FROM unnest($5::text[]) AS d(domain)
    CROSS JOIN LATERAL (
        SELECT r.message_id, r.idx, r.next_attempt_at FROM recipients r
        WHERE r.domain = d.domain AND r.state = 'queued' AND r.next_attempt_at <= $1
          AND (r.lease_until IS NULL OR r.lease_until <= $6)
          AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = r.message_id AND m.corrupt_reason IS NOT NULL)
        ORDER BY r.next_attempt_at, r.message_id, r.idx
        LIMIT $2
        FOR UPDATE OF r SKIP LOCKED
    ) AS x
    ORDER BY x.next_attempt_at, x.message_id, x.idx
    LIMIT $2
)
UPDATE recipients r SET lease_owner = $3, lease_until = $4
FROM due WHERE r.message_id = due.message_id AND r.idx = due.idx
RETURNING r.message_id, r.idx, r.next_attempt_at
"""

# One round trip records a batch of outcomes: lock the recipients, check that `owner` holds every lease
# (else nothing is written: LeaseLost), and set the new states. What a Deferred does to a HELD recipient
# depends on its current state, so that part is decided here, on the locked row (see _outcome_kind).
_RECORD = """
WITH u AS (
    SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::float8[], $5::bool[], $6::text[], $7::bool[])
        AS u(qid, idx, kind, next_at, attempted, reply, delay)
), cur AS (
    SELECT r.message_id, r.idx, r.lease_owner FROM recipients r JOIN u ON r.message_id = u.qid AND r.idx = u.idx
    ORDER BY r.message_id, r.idx
    FOR UPDATE OF r
), lost AS (
    SELECT count(*) AS n FROM u LEFT JOIN cur ON cur.message_id = u.qid AND cur.idx = u.idx
    WHERE cur.lease_owner IS DISTINCT FROM $8
)
UPDATE recipients r SET
    state = CASE u.kind WHEN 'delivered' THEN 'delivered' WHEN 'bounced' THEN 'bounced' WHEN 'expired' THEN 'expired'
                        WHEN 'guard' THEN 'held'
                        WHEN 'deferred' THEN CASE r.state WHEN 'held' THEN 'held' ELSE 'queued' END END,
    held_reason = CASE WHEN u.kind IN ('guard', 'deferred') AND r.state = 'held' THEN r.held_reason
                       WHEN u.kind = 'guard' THEN 'recovery-guard' END,
    next_attempt_at = CASE WHEN u.kind IN ('guard', 'deferred') THEN u.next_at ELSE r.next_attempt_at END,
    attempts = r.attempts + CASE WHEN u.attempted THEN 1 ELSE 0 END,
    last_attempt_at = CASE WHEN u.attempted THEN $9 ELSE r.last_attempt_at END,
    last_reply = CASE WHEN u.attempted THEN u.reply ELSE r.last_reply END,
    delay_notified = r.delay_notified OR u.delay,
    lease_owner = NULL, lease_until = NULL, updated_at = $9
FROM u
WHERE r.message_id = u.qid AND r.idx = u.idx AND r.lease_owner = $8 AND (SELECT n FROM lost) = 0
"""


def _outcome_kind(u: RecipientUpdate) -> str:
    """What an update does: "delivered" | "bounced" | "expired" | "guard" | "deferred" (_RECORD applies it).

    The mail really went out on Delivered, so that wins over an operator's hold placed during the
    attempt; a Deferred outcome never turns a HELD recipient back into QUEUED; a guard hold keeps an
    operator's reason when the recipient was already held."""
    if isinstance(u.outcome, Delivered):
        return "delivered"
    if isinstance(u.outcome, Bounced):
        return "bounced"
    if u.expire:
        return "expired"
    if u.outcome is None:
        raise _Clean(SpoolError(f"{u.message_id}[{u.index}]: an update needs an outcome or expire=True"))
    return "guard" if u.outcome.guard_hold else "deferred"


def _target(message_id: QueueId | None, domain: str | None, params: list[Any]) -> str:
    where = ""
    if message_id is not None:
        params.append(message_id)
        where += f" AND message_id = ${len(params)}"
    if domain is not None:
        params.append(domain.lower())
        where += f" AND domain = ${len(params)}"
    return where


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node that opened this spool: what `backupmx spool nodes` and the dashboard show."""

    name: str
    host: str
    pid: int
    version: str
    started_at: float
    seen_at: float


# --- the spool ------------------------------------------------------------------------------------------
class PostgresSpool:
    """The Spool contract on a PostgreSQL database shared by every node (`[spool] url`).

    `node` is this node's name (`server.node_name`): it shards the counters and names the node in
    `received_by` and the nodes table; leases are owned by the `owner` the delivery engine passes."""

    def __init__(
        self,
        url: str,
        *,
        node: str = "local",
        clock: Clock | None = None,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        command_timeout: float = 60.0,
        lease_clock: Literal["database", "node"] | None = None,
    ) -> None:
        self.url = url
        self.node = node
        self.clock: Clock = clock or SystemClock()
        # Leases are kept on the database's clock, so a node whose clock is ahead can never see a live
        # lease of another node as run out (two copies). A test clock (FakeClock) keeps them on its own
        # time, so tests can let leases run out by moving it.
        self.lease_clock = lease_clock or ("database" if isinstance(self.clock, SystemClock) else "node")
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._writer: _Writer | None = None
        self._pool: Any = None
        self._open_lock = asyncio.Lock()
        self._node_seen_at: float | None = None

    async def _lease_now(self, conn: Connection, now: float) -> float:
        """The time leases are measured on: the database's (clock_timestamp, not the transaction's
        start) or, with `lease_clock = "node"`, the caller's `now`."""
        if self.lease_clock == "node":
            return now
        return float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8"))

    # -- connections ---------------------------------------------------------------------------------
    def _server_settings(self) -> dict[str, str]:
        return {
            "application_name": f"backupmx {self.node}"[:63],
            "search_path": f"{SCHEMA}, pg_temp",
            "backupmx.shard": self.node,
            "lock_timeout": "30s",
            "statement_timeout": "300s",
            "idle_in_transaction_session_timeout": "120s",
            # A node that vanished without closing its socket loses its session (and row locks) soon.
            "tcp_keepalives_idle": "10",
            "tcp_keepalives_interval": "5",
            "tcp_keepalives_count": "3",
        }

    async def _connect(self) -> Connection:
        return await asyncpg.connect(
            self.url,
            timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            server_settings=self._server_settings(),
        )

    async def open(self) -> None:
        async with self._open_lock:
            if self._writer is not None:
                return
            conn: Connection | None = None
            try:
                conn = await self._connect()
                await migrate(conn)
                await self._check_settings(conn)
                await self._reap_uploads(conn, self.clock.now())
                self._pool = await asyncpg.create_pool(
                    self.url,
                    min_size=0,
                    max_size=self.pool_size,
                    max_inactive_connection_lifetime=60.0,
                    timeout=self.connect_timeout,
                    command_timeout=self.command_timeout,
                    server_settings=self._server_settings(),
                )
            except Exception as exc:
                if conn is not None:
                    conn.terminate()
                raise map_error(exc) from exc
            writer = _Writer(self._connect)
            writer.start(conn)
            self._writer = writer

    async def migrate(self) -> tuple[int, int]:
        """Create or upgrade the schema without opening the spool: (version before, version after)."""
        try:
            conn = await self._connect()
        except Exception as exc:
            raise map_error(exc) from exc
        try:
            return await migrate(conn)
        except Exception as exc:
            raise map_error(exc) from exc
        finally:
            await conn.close()

    async def close(self) -> None:
        async with self._open_lock:
            writer, self._writer = self._writer, None
            pool, self._pool = self._pool, None
            if writer is not None:
                await writer.stop()
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), timeout=5.0)
                except Exception:
                    pool.terminate()

    async def _check_settings(self, conn: Connection) -> None:
        """Warn (once per start) about server settings that break the promise of the 250."""
        for name, unsafe in (("fsync", "off"), ("full_page_writes", "off"), ("synchronous_commit", "off")):
            value = await conn.fetchval("SELECT current_setting($1)", name)
            if value == unsafe:
                log.warning("spool: PostgreSQL %s = %s: an acknowledged message can be lost in a crash", name, value)

    async def _reap_uploads(self, conn: Connection, now: float) -> int:
        """Remove bodies uploaded by a node that died before their message was committed."""
        status = await conn.execute(
            "WITH stale AS (DELETE FROM body_uploads WHERE started_at < $1 RETURNING message_id)"
            " DELETE FROM body_chunks c USING stale WHERE c.message_id = stale.message_id"
            " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = stale.message_id)",
            now - UPLOAD_STALE_SECONDS,
        )
        return _count(status)

    def statistics(self) -> SpoolStatistics:
        w = self._writer
        if w is None:
            return SpoolStatistics()
        return SpoolStatistics(
            commits=w.commits,
            groups=w.groups,
            operations=w.operations,
            puts=w.puts,
            failed_operations=w.failed,
            largest_group=w.largest_group,
            split_groups=w.split_groups,
        )

    # -- plumbing ------------------------------------------------------------------------------------
    async def _write(self, fn: Callable[[Connection], Awaitable[T]], *, is_put: bool = False) -> T:
        writer = self._writer
        if writer is None:
            raise SpoolUnavailable("spool is not open")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        writer.submit(_Op(fn, fut, is_put))
        return await fut

    async def _read(self, fn: Callable[[Connection], Awaitable[T]], *, snapshot: bool = False) -> T:
        pool = self._pool
        if pool is None:
            raise SpoolUnavailable("spool is not open")
        for attempt in (1, 2):
            try:
                async with pool.acquire(timeout=self.connect_timeout + self.command_timeout) as conn:
                    if snapshot:
                        async with conn.transaction(isolation="repeatable_read", readonly=True):
                            return await fn(conn)
                    return await fn(conn)
            except SpoolError:
                raise
            except Exception as exc:
                # A pooled connection from before a database restart fails once: reads are safe to repeat.
                if attempt == 1 and (
                    isinstance(exc, asyncpg.InterfaceError | asyncpg.PostgresConnectionError)
                    or _sqlstate(exc).startswith("57P")
                ):
                    continue
                raise map_error(exc) from exc
        raise SpoolUnavailable("spool unavailable")  # not reached

    def _now(self, now: float | None) -> float:
        return self.clock.now() if now is None else now

    async def _set_aside(self, problems: Sequence[tuple[str, str]]) -> None:
        if not problems:
            return
        now = self.clock.now()

        async def op(conn: Connection) -> None:
            for qid, reason in problems:
                await _mark_corrupt(conn, qid, reason, now)

        try:
            await self._write(op)
        except SpoolError:
            log.exception("spool: could not set aside corrupt entries")

    # -- accept path ---------------------------------------------------------------------------------
    async def put(self, envelope: Envelope, body: BodyBuffer, *, now: float | None = None) -> QueueId:
        t = self._now(now)
        return await self.put_with_id(new_queue_id(t), envelope, body, now=t)

    async def put_with_id(
        self, queue_id: QueueId, envelope: Envelope, body: BodyBuffer, *, now: float | None = None
    ) -> QueueId:
        t = self._now(now)
        await self._store(queue_id, envelope, body, t)
        return queue_id

    async def put_record(self, message: MessageRecord, body: BodyBuffer) -> None:
        """Import a message exactly as another spool holds it (ID, arrival, every recipient's state,
        attempts and replies), for `backupmx spool copy`. Leases are not carried over."""
        if body.size != message.size:
            raise SpoolError(f"{message.id}: body is {body.size} bytes, the record says {message.size}")
        await self._store(message.id, message.envelope, body, message.received_at, message.recipients)

    async def _store(
        self,
        qid: QueueId,
        envelope: Envelope,
        body: BodyBuffer,
        received_at: float,
        recipients: Sequence[RecipientRecord] | None = None,
    ) -> None:
        if body.size <= INLINE_BODY_MAX:

            async def op(conn: Connection) -> None:
                stored = _inline_body(body.chunks(CHUNK), body.size)
                await _insert_message(conn, qid, envelope, stored, received_at, self.node, recipients)

            await self._write(op, is_put=True)
            return
        stored = await self._upload(qid, body, received_at)

        async def op_staged(conn: Connection) -> None:
            await _insert_message(conn, qid, envelope, stored, received_at, self.node, recipients)

        try:
            await self._write(op_staged, is_put=True)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._drop_upload(qid))
            raise

    async def _upload(self, qid: QueueId, body: BodyBuffer, now: float) -> _StoredBody:
        """Write a large body (committed, as an upload) before the group commit of its message."""

        async def fn(conn: Connection) -> _StoredBody:
            crc = 0
            seq = 0
            written = 0
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO body_uploads (message_id, node, started_at) VALUES ($1, $2, $3)", qid, self.node, now
                )
                stmt = await conn.prepare("INSERT INTO body_chunks (message_id, seq, data) VALUES ($1, $2, $3)")
                for chunk in body.chunks(CHUNK):
                    await stmt.fetch(qid, seq, chunk)
                    crc = zlib.crc32(chunk, crc)
                    written += len(chunk)
                    seq += 1
            if written != body.size:
                raise SpoolError(f"body of {qid} is {written} bytes, declared {body.size}")
            return _StoredBody(size=written, crc=crc, chunks=seq, inline=None)

        pool = self._pool
        if pool is None:
            raise SpoolUnavailable("spool is not open")
        for attempt in (1, 2):
            try:
                async with pool.acquire(timeout=self.connect_timeout + self.command_timeout) as conn:
                    return await fn(conn)
            except SpoolError:
                raise
            except Exception as exc:
                # A pooled connection that died while idle: the upload was not committed, write it again.
                if attempt == 1 and _connection_lost(exc) and not isinstance(exc, TimeoutError):
                    continue
                raise map_error(exc) from exc
        raise SpoolUnavailable("spool unavailable")  # not reached

    async def _drop_upload(self, qid: QueueId) -> None:
        """Best effort: remove the upload of a put that failed (else it is reaped after an hour)."""

        async def fn(conn: Connection) -> None:
            await conn.execute(
                "WITH u AS (DELETE FROM body_uploads WHERE message_id = $1 RETURNING message_id)"
                " DELETE FROM body_chunks c USING u WHERE c.message_id = u.message_id"
                " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = u.message_id)",
                qid,
            )

        await self._read(fn)

    # -- delivery path -------------------------------------------------------------------------------
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
        wanted = None if domains is None else list(dict.fromkeys(d.lower() for d in domains))
        excluded = {d.lower() for d in exclude_domains}

        async def op(conn: Connection) -> list[Claim]:
            doms = wanted
            if doms is None and excluded:
                doms = [
                    r["domain"]
                    for r in await conn.fetch(
                        "SELECT domain FROM rcpt_counts WHERE state = 'queued' GROUP BY domain HAVING sum(n) > 0"
                    )
                    if r["domain"] not in excluded
                ]
                if not doms:
                    return []
            lease_now = await self._lease_now(conn, now)
            until = lease_now + lease_seconds
            if doms is None:
                rows = await conn.fetch(_CLAIM_ANY, now, limit, owner, until, lease_now)
            else:
                rows = await conn.fetch(_CLAIM_DOMAINS, now, limit, owner, until, doms, lease_now)
            await self._touch_node(conn, now)
            if not rows:
                return []
            rows = sorted(rows, key=lambda r: (r["next_attempt_at"], r["message_id"], r["idx"]))
            by_message: dict[str, list[int]] = {}
            for r in rows:
                by_message.setdefault(r["message_id"], []).append(r["idx"])
            mrows = await conn.fetch(f"SELECT {_MSG_COLS} FROM messages WHERE id = ANY($1::text[])", list(by_message))
            loaded = {rec.id: (rec, problem) for rec, problem in await _load_messages(conn, mrows)}
            claims: list[Claim] = []
            for qid, idxs in by_message.items():
                found = loaded.get(QueueId(qid))
                if found is None or found[1] is not None:
                    if found is not None and found[1] is not None:
                        await _mark_corrupt(conn, qid, found[1], now)
                    await conn.execute(
                        "UPDATE recipients SET lease_owner = NULL, lease_until = NULL"
                        " WHERE message_id = $1 AND idx = ANY($2::int[])",
                        qid,
                        idxs,
                    )
                    continue
                record = found[0]
                keep = set(idxs)
                claimed = tuple(r for r in record.recipients if r.index in keep)
                claims.append(Claim(message=record, recipients=claimed, owner=owner, lease_until=until))
            return claims

        return await self._write(op)

    async def _touch_node(self, conn: Connection, now: float) -> None:
        """A node is what claims mail (not a CLI command on the same spool): registered at its first
        claim, then seen again every NODE_SEEN_INTERVAL."""
        if self._node_seen_at is not None and abs(now - self._node_seen_at) < NODE_SEEN_INTERVAL:
            return
        first = self._node_seen_at is None
        self._node_seen_at = now
        if not first:
            await conn.execute("UPDATE nodes SET seen_at = $2 WHERE name = $1", self.node, now)
            return
        host = socket.gethostname()
        other = await conn.fetchrow("SELECT host, seen_at FROM nodes WHERE name = $1", self.node)
        if other is not None and other["host"] != host and abs(now - other["seen_at"]) < 4 * NODE_SEEN_INTERVAL:
            log.warning(
                "spool: node name %r is also used on %s (seen %.0fs ago): two nodes with one name share "
                "their leases; give each node its own server.node_name",
                self.node,
                other["host"],
                now - other["seen_at"],
            )
        await conn.execute(
            "INSERT INTO nodes (name, host, pid, version, started_at, seen_at) VALUES ($1, $2, $3, $4, $5, $5)"
            " ON CONFLICT (name) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
            " version = excluded.version, started_at = excluded.started_at, seen_at = excluded.seen_at",
            self.node,
            host,
            os.getpid(),
            __version__,
            now,
        )

    async def renew(self, claims: Sequence[Claim], *, now: float, lease_seconds: float) -> None:
        keys = [(c.owner, r.message_id, r.index) for c in claims for r in c.recipients]
        if not keys:
            return

        async def op(conn: Connection) -> None:
            until = await self._lease_now(conn, now) + lease_seconds
            rows = await conn.fetch(
                "SELECT r.message_id, r.idx, r.lease_owner FROM recipients r"
                " JOIN unnest($1::text[], $2::int[]) AS k(qid, idx) ON r.message_id = k.qid AND r.idx = k.idx"
                " ORDER BY r.message_id, r.idx FOR UPDATE OF r",
                [k[1] for k in keys],
                [k[2] for k in keys],
            )
            held = {(r["message_id"], r["idx"]): r["lease_owner"] for r in rows}
            for owner, qid, idx in keys:
                if held.get((qid, idx)) != owner:
                    raise _Clean(LeaseLost(f"{qid}[{idx}]: lease no longer held by {owner}"))
            await conn.execute(
                "UPDATE recipients r SET lease_until = $4 FROM unnest($1::text[], $2::int[], $3::text[])"
                " AS k(qid, idx, owner) WHERE r.message_id = k.qid AND r.idx = k.idx AND r.lease_owner = k.owner",
                [k[1] for k in keys],
                [k[2] for k in keys],
                [k[0] for k in keys],
                until,
            )

        await self._write(op)

    async def claim_held(
        self, message_id: QueueId, *, reason: str, owner: str, lease_seconds: float, now: float
    ) -> Claim | None:
        async def op(conn: Connection) -> Claim | None:
            lease_now = await self._lease_now(conn, now)
            until = lease_now + lease_seconds
            rows = await conn.fetch(
                "SELECT idx FROM recipients WHERE message_id = $1 AND state = 'held' AND held_reason = $2"
                " AND (lease_until IS NULL OR lease_until <= $3) ORDER BY idx FOR UPDATE SKIP LOCKED",
                message_id,
                reason,
                lease_now,
            )
            idxs = [int(r["idx"]) for r in rows]
            if not idxs:
                return None
            mrows = await conn.fetch(f"SELECT {_MSG_COLS} FROM messages WHERE id = $1", message_id)
            loaded = await _load_messages(conn, mrows)
            if not loaded or loaded[0][1] is not None:
                if loaded:
                    await _mark_corrupt(conn, message_id, loaded[0][1] or "", now)
                return None
            await conn.execute(
                "UPDATE recipients SET lease_owner = $1, lease_until = $2"
                " WHERE message_id = $3 AND idx = ANY($4::int[])",
                owner,
                until,
                message_id,
                idxs,
            )
            record = loaded[0][0]
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

        async def op(conn: Connection) -> None:
            await conn.execute(
                "UPDATE recipients r SET lease_owner = NULL, lease_until = NULL,"
                " next_attempt_at = coalesce(k.due, r.next_attempt_at)"
                " FROM unnest($1::text[], $2::int[], $3::text[], $4::float8[]) AS k(qid, idx, owner, due)"
                " WHERE r.message_id = k.qid AND r.idx = k.idx AND r.lease_owner = k.owner",
                [k[1] for k in keys],
                [k[2] for k in keys],
                [k[0] for k in keys],
                [k[3] for k in keys],
            )

        await self._write(op)

    async def record(
        self, owner: str, updates: Sequence[RecipientUpdate], new_messages: Sequence[NewMessage] = (), *, now: float
    ) -> list[QueueId]:
        updates = list(updates)
        new_messages = list(new_messages)

        async def op(conn: Connection) -> list[QueueId]:
            if updates:
                keys = {(u.message_id, u.index) for u in updates}
                kinds = [_outcome_kind(u) for u in updates]
                status = await conn.execute(
                    _RECORD,
                    [u.message_id for u in updates],
                    [u.index for u in updates],
                    kinds,
                    [u.next_attempt_at for u in updates],
                    [u.outcome is not None for u in updates],
                    [str(u.outcome.reply) if u.outcome is not None else None for u in updates],
                    [u.delay_notified for u in updates],
                    owner,
                    now,
                )
                done = _count(status)
                if done != len(keys):
                    lost = LeaseLost(f"{updates[0].message_id}...: a lease is no longer held by {owner}")
                    if done == 0:
                        raise _Clean(lost)  # nothing written
                    raise lost
            ids: list[QueueId] = []
            for m in new_messages:
                qid = new_queue_id(now)
                await _insert_message(conn, qid, m.envelope, _inline_body((m.body,), len(m.body)), now, self.node)
                ids.append(qid)
            return ids

        return await self._write(op, is_put=bool(new_messages))

    async def read_body(self, message_id: QueueId) -> bytes:
        return b"".join([chunk async for chunk in self.iter_body(message_id)])

    async def iter_body(self, message_id: QueueId, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Chunks of the stored body, at most `chunk_size` bytes each. The checksum is known only at the
        end: a damaged body raises SpoolError after its last chunk, so a relay must send the final "."
        only once this iterator has finished without error."""
        chunk_size = max(1, chunk_size)
        first = await self._read(
            lambda c: c.fetchrow(
                "SELECT m.size, m.checksum, m.corrupt_reason, m.chunks, array(SELECT b.data FROM body_chunks b"
                " WHERE b.message_id = m.id AND b.seq < $2 ORDER BY b.seq) AS head FROM messages m WHERE m.id = $1",
                message_id,
                READ_BATCH,
            )
        )
        if first is None:
            raise NotFound(f"no message {message_id}")
        if first["corrupt_reason"] is not None:
            raise SpoolError(f"{message_id} is set aside as corrupt: {first['corrupt_reason']}")
        size, expected, chunks = int(first["size"]), str(first["checksum"]), int(first["chunks"])
        batch: list[bytes] = list(first["head"])
        if len(batch) != min(READ_BATCH, chunks):
            await self._damaged(message_id, "body chunks missing")
        crc, total, seq = 0, 0, 0
        while seq < chunks:
            if not batch:
                start = seq
                rows = await self._chunk_rows(message_id, start)
                if [r["seq"] for r in rows] != list(range(start, min(chunks, start + READ_BATCH))):
                    if not await self._exists(message_id):
                        raise NotFound(f"no message {message_id}")  # deleted while we read it
                    await self._damaged(message_id, f"body chunk {start} missing")
                batch = [r["data"] for r in rows]
            data = batch.pop(0)
            seq += 1
            crc = zlib.crc32(data, crc)
            total += len(data)
            for start in range(0, len(data), chunk_size):
                yield data[start : start + chunk_size]
        if total != size:
            await self._damaged(message_id, f"body is {total} bytes, expected {size}")
        if crc_text(crc) != expected:
            await self._damaged(message_id, f"body checksum mismatch: stored {expected}, computed {crc_text(crc)}")

    async def _chunk_rows(self, message_id: QueueId, start: int) -> list[Any]:
        return await self._read(
            lambda c: c.fetch(
                "SELECT seq, data FROM body_chunks WHERE message_id = $1 AND seq >= $2 AND seq < $3 ORDER BY seq",
                message_id,
                start,
                start + READ_BATCH,
            )
        )

    async def _damaged(self, message_id: QueueId, reason: str) -> None:
        await self._set_aside([(message_id, reason)])
        raise SpoolError(f"{message_id}: {reason}")

    async def _exists(self, message_id: QueueId) -> bool:
        row = await self._read(lambda c: c.fetchval("SELECT 1 FROM messages WHERE id = $1", message_id))
        return row is not None

    async def next_due_at(self, *, domains: Sequence[str] | None = None) -> float | None:
        now = self.clock.now()
        doms = None if domains is None else [d.lower() for d in domains]
        if doms is not None and not doms:
            return None
        where = "" if doms is None else " AND domain = ANY($2::text[])"
        args: list[Any] = [now] if doms is None else [now, doms]

        async def fn(conn: Connection) -> float | None:
            # Unleased (or lease expired): the first by next_attempt_at; leased: when the lease runs out.
            free = await conn.fetchval(
                "SELECT min(next_attempt_at) FROM recipients WHERE state = 'queued'"
                " AND (lease_until IS NULL OR lease_until <= $1)" + where,
                *args,
            )
            leased = await conn.fetchval(
                "SELECT min(greatest(next_attempt_at, lease_until)) FROM recipients"
                " WHERE lease_until > $1 AND state = 'queued'" + where,
                *args,
            )
            found = [v for v in (free, leased) if v is not None]
            return min(found) if found else None

        return await self._read(fn)

    # -- operator actions ----------------------------------------------------------------------------
    async def hold(
        self,
        message_id: QueueId | None,
        *,
        reason: str = "operator",
        domain: str | None = None,
        now: float | None = None,
    ) -> int:
        params: list[Any] = [reason, self._now(now)]
        where = _target(message_id, domain, params)

        async def op(conn: Connection) -> int:
            return _count(
                await conn.execute(
                    "UPDATE recipients SET state = 'held', held_reason = $1, updated_at = $2"
                    f" WHERE state = 'queued'{where}",
                    *params,
                )
            )

        return await self._write(op)

    async def release_held(
        self,
        message_id: QueueId | None,
        *,
        domain: str | None = None,
        reason: str | None = None,
        now: float | None = None,
    ) -> int:
        params: list[Any] = [self._now(now)]
        where = _target(message_id, domain, params)
        if reason is not None:
            params.append(reason)
            where += f" AND held_reason = ${len(params)}"

        async def op(conn: Connection) -> int:
            return _count(
                await conn.execute(
                    "UPDATE recipients SET state = 'queued', held_reason = NULL, next_attempt_at = $1, updated_at = $1"
                    f" WHERE state = 'held'{where}",
                    *params,
                )
            )

        return await self._write(op)

    async def delete(self, message_id: QueueId) -> bool:
        async def op(conn: Connection) -> bool:
            return await self._delete_messages(conn, [message_id]) > 0

        return await self._write(op)

    @staticmethod
    async def _delete_messages(conn: Connection, ids: list[str]) -> int:
        return _count(
            await conn.execute(
                "WITH r AS (DELETE FROM recipients WHERE message_id = ANY($1::text[])),"
                " d AS (DELETE FROM msg_domains WHERE message_id = ANY($1::text[])),"
                " b AS (DELETE FROM body_chunks WHERE message_id = ANY($1::text[]))"
                " DELETE FROM messages WHERE id = ANY($1::text[])",
                ids,
            )
        )

    async def flush(self, domain: str | None = None, *, now: float | None = None) -> int:
        params: list[Any] = [self._now(now)]
        where = _target(None, domain, params)

        async def op(conn: Connection) -> int:
            return _count(
                await conn.execute(
                    "UPDATE recipients SET next_attempt_at = $1, updated_at = $1"
                    f" WHERE state = 'queued' AND next_attempt_at > $1{where}",
                    *params,
                )
            )

        return await self._write(op)

    async def purge(self, *, before: float, limit: int = 10_000) -> int:
        """Delete up to `limit` finished messages (every recipient delivered/bounced/expired) whose last
        change is older than `before`, bodies included; also stale uploads and expired shared state.
        In batches of PURGE_BATCH, each its own write, so accepts are never held up for long; messages
        another node is purging at the same moment are skipped, not waited for."""
        now = self.clock.now()
        total = 0

        async def op(conn: Connection, batch: int) -> int:
            ids = [
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM messages WHERE pending_rcpts = 0 AND corrupt_reason IS NULL AND finished_at < $1"
                    " ORDER BY finished_at, id LIMIT $2 FOR UPDATE SKIP LOCKED",
                    before,
                    batch,
                )
            ]
            return await self._delete_messages(conn, ids) if ids else 0

        while total < limit:
            batch = min(PURGE_BATCH, limit - total)
            deleted = await self._write(lambda conn, b=batch: op(conn, b))  # type: ignore[misc]
            total += deleted
            if deleted < batch:
                break

        async def housekeeping(conn: Connection) -> None:
            await self._reap_uploads(conn, now)
            await conn.execute("DELETE FROM kv WHERE expires_at <= $1", now)

        await self._write(housekeeping)
        return total

    # -- reading -------------------------------------------------------------------------------------
    async def get(self, message_id: QueueId) -> MessageRecord | None:
        async def fn(conn: Connection) -> list[tuple[MessageRecord, str | None]]:
            rows = await conn.fetch(f"SELECT {_MSG_COLS} FROM messages WHERE id = $1", message_id)
            return await _load_messages(conn, rows)

        found = await self._read(fn, snapshot=True)
        if not found:
            return None
        record, problem = found[0]
        if problem is not None:
            await self._set_aside([(message_id, problem)])
        return record

    async def list_messages(
        self, flt: QueueFilter = _DEFAULT_FILTER, *, limit: int = 100, after: QueueId | None = None
    ) -> list[MessageRecord]:
        params: list[Any] = [after or ""]
        where = ["m.id > $1"]
        if flt.pending_only:
            where.append("m.pending_rcpts > 0")
        if flt.kind is not None:
            params.append(str(flt.kind))
            where.append(f"m.kind = ${len(params)}")
        if flt.sender is not None:
            params.append(flt.sender.lower())
            where.append(f"strpos(lower(m.sender), ${len(params)}) > 0")
        rc: list[str] = []
        if flt.domain is not None:
            params.append(flt.domain.lower())
            rc.append(f"r.domain = ${len(params)}")
        if flt.recipient is not None:
            params.append(flt.recipient.lower())
            rc.append(f"strpos(lower(r.address), ${len(params)}) > 0")
        if flt.state is not None:
            params.append(RecipientState(flt.state).value)
            rc.append(f"r.state = ${len(params)}")
        if flt.held_reason is not None:
            params.append(flt.held_reason)
            rc.append(f"r.state = 'held' AND r.held_reason = ${len(params)}")
        if rc:
            where.append(f"EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id AND {' AND '.join(rc)})")
        params.append(max(0, limit))
        sql = f"SELECT {_MSG_COLS} FROM messages m WHERE {' AND '.join(where)} ORDER BY m.id LIMIT ${len(params)}"

        async def fn(conn: Connection) -> list[tuple[MessageRecord, str | None]]:
            return await _load_messages(conn, await conn.fetch(sql, *params))  # one page, bounded by `limit`

        loaded = await self._read(fn, snapshot=True)
        await self._set_aside([(rec.id, p) for rec, p in loaded if p is not None])
        return [rec for rec, _ in loaded]

    async def count_pending(self, *, include_kinds: Sequence[str] = ("user", "dsn")) -> int:
        kinds = [str(k) for k in include_kinds]
        if not kinds:
            return 0
        value = await self._read(
            lambda c: c.fetchval("SELECT coalesce(sum(n), 0) FROM msg_counts WHERE kind = ANY($1::text[])", kinds)
        )
        return int(value)

    async def stats(self) -> SpoolStats:
        async def fn(conn: Connection) -> SpoolStats:
            by_state: dict[str, int] = {}
            per_domain: dict[str, dict[str, int]] = {}
            for row in await conn.fetch(
                "SELECT domain, state, sum(n)::bigint AS n FROM rcpt_counts"
                " GROUP BY domain, state HAVING sum(n) <> 0 ORDER BY domain, state"
            ):
                per_domain.setdefault(row["domain"], {})[row["state"]] = int(row["n"])
                by_state[row["state"]] = by_state.get(row["state"], 0) + int(row["n"])
            dom_msgs = {
                row["domain"]: int(row["n"])
                for row in await conn.fetch("SELECT domain, sum(n)::bigint AS n FROM dom_pending GROUP BY domain")
            }
            oldest_by_domain = {
                row["domain"]: row["oldest"]
                for row in await conn.fetch(
                    "SELECT d.domain, (SELECT m.received_at FROM msg_domains md JOIN messages m ON m.id = md.message_id"
                    " WHERE md.domain = d.domain AND md.pending > 0 ORDER BY md.message_id LIMIT 1) AS oldest"
                    " FROM unnest($1::text[]) AS d(domain)",
                    list(per_domain),
                )
            }
            held: dict[str, tuple[dict[str, int], dict[str, float]]] = {}
            if by_state.get("held"):  # the partial index of held recipients: nothing read when none is held
                for row in await conn.fetch(
                    "SELECT domain, coalesce(held_reason, 'operator') AS reason, count(*) AS n,"
                    " min(updated_at) AS since FROM recipients WHERE state = 'held' GROUP BY 1, 2"
                ):
                    n_by, at_by = held.setdefault(row["domain"], ({}, {}))
                    n_by[row["reason"]] = int(row["n"])
                    at_by[row["reason"]] = float(row["since"])
            domains = tuple(
                DomainStats(
                    domain=domain,
                    by_state=states,
                    messages_pending=dom_msgs.get(domain, 0),
                    oldest_pending_at=oldest_by_domain.get(domain),
                    held_by_reason=held.get(domain, ({}, {}))[0],
                    held_since=held.get(domain, ({}, {}))[1],
                )
                for domain, states in per_domain.items()
            )
            pending = await conn.fetchval("SELECT coalesce(sum(n), 0) FROM msg_counts")
            oldest = await conn.fetchval(
                "SELECT received_at FROM messages WHERE pending_rcpts > 0"
                " AND corrupt_reason IS NULL ORDER BY id LIMIT 1"
            )
            corrupt = await conn.fetchval("SELECT count(*) FROM messages WHERE corrupt_reason IS NOT NULL")
            size = await conn.fetchval(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'",
                SCHEMA,
            )
            return SpoolStats(
                messages_pending=int(pending),
                recipients_by_state=by_state,
                domains=domains,
                oldest_pending_at=oldest,
                corrupt=int(corrupt),
                bytes_on_disk=int(size),
            )

        return await self._read(fn, snapshot=True)

    async def list_corrupt(self) -> list[tuple[QueueId, str]]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT id, corrupt_reason FROM messages WHERE corrupt_reason IS NOT NULL ORDER BY id LIMIT $1",
                LIST_CORRUPT_LIMIT,
            )
        )
        return [(QueueId(r["id"]), str(r["corrupt_reason"])) for r in rows]

    async def nodes(self) -> list[NodeInfo]:
        """The nodes that opened this spool, most recently seen first."""
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT name, host, pid, version, started_at, seen_at FROM nodes ORDER BY seen_at DESC, name"
            )
        )
        return [NodeInfo(**dict(r)) for r in rows]

    # -- outages (shared by every node) --------------------------------------------------------------
    async def outage_started(self, domain: str, at: float) -> None:
        d = domain.lower()

        async def op(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO outages (domain, started_at, started_by) VALUES ($1, $2, $3)"
                " ON CONFLICT (domain) WHERE ended_at IS NULL DO NOTHING",
                d,
                at,
                self.node,
            )

        await self._write(op)

    async def outage_ended(self, domain: str, at: float) -> None:
        d = domain.lower()

        async def op(conn: Connection) -> None:
            await conn.execute(
                "UPDATE outages SET ended_at = $2, ended_by = $3 WHERE domain = $1 AND ended_at IS NULL",
                d,
                at,
                self.node,
            )

        await self._write(op)

    async def outages(self, domain: str | None = None, *, since: float = 0.0) -> list[OutagePeriod]:
        params: list[Any] = [since]
        sql = "SELECT domain, started_at, ended_at FROM outages WHERE (ended_at IS NULL OR ended_at >= $1)"
        if domain is not None:
            params.append(domain.lower())
            sql += " AND domain = $2"
        sql += " ORDER BY started_at, domain LIMIT 100000"
        rows = await self._read(lambda c: c.fetch(sql, *params))
        return [OutagePeriod(r["domain"], r["started_at"], r["ended_at"]) for r in rows]

    # -- shared state for the other parts of backupmx ------------------------------------------------
    async def kv_get(self, namespace: str, key: str) -> bytes | None:
        """The value under (namespace, key), or None (also when it has expired)."""
        now = self.clock.now()
        value = await self._read(
            lambda c: c.fetchval(
                "SELECT value FROM kv WHERE namespace = $1 AND key = $2 AND (expires_at IS NULL OR expires_at > $3)",
                namespace,
                key,
                now,
            )
        )
        return None if value is None else bytes(value)

    async def kv_put(
        self, namespace: str, key: str, value: bytes, *, expires_at: float | None = None, now: float | None = None
    ) -> None:
        """Set (namespace, key) to `value` for every node, committed with this node's next group."""
        t = self._now(now)

        async def op(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO kv (namespace, key, value, updated_at, updated_by, expires_at)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (namespace, key) DO UPDATE SET"
                " value = excluded.value, updated_at = excluded.updated_at, updated_by = excluded.updated_by,"
                " expires_at = excluded.expires_at",
                namespace,
                key,
                value,
                t,
                self.node,
                expires_at,
            )

        await self._write(op)

    async def kv_delete(self, namespace: str, key: str) -> bool:
        async def op(conn: Connection) -> bool:
            return _count(await conn.execute("DELETE FROM kv WHERE namespace = $1 AND key = $2", namespace, key)) > 0

        return await self._write(op)

    async def kv_list(
        self, namespace: str, *, prefix: str = "", after: str | None = None, limit: int = KV_LIST_MAX
    ) -> list[KvItem]:
        """A page of live items of `namespace` whose key starts with `prefix`, in key order after `after`."""
        now = self.clock.now()
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT namespace, key, value, updated_at, updated_by, expires_at FROM kv WHERE namespace = $1"
                " AND key > $2 AND left(key, length($3)) = $3 AND (expires_at IS NULL OR expires_at > $4)"
                " ORDER BY key LIMIT $5",
                namespace,
                after or "",
                prefix,
                now,
                max(0, min(limit, KV_LIST_MAX)),
            )
        )
        return [
            KvItem(r["namespace"], r["key"], bytes(r["value"]), r["updated_at"], r["updated_by"], r["expires_at"])
            for r in rows
        ]


__all__ = ["KvItem", "NodeInfo", "PostgresSpool", "map_error"]
