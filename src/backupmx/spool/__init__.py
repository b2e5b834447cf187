"""The Spool contract: where accepted mail lives until the primary has it.

Promises every backend keeps (tested by one suite in tests/spool_contract/):
- `put` returns only after the message, its envelope and one QUEUED row per recipient are committed
  to stable storage (fsync'd). Concurrent puts are group-committed: one transaction, one fsync for all
  that wait at that moment. On failure it raises SpoolFullError (-> 452 4.3.1) or SpoolError
  (-> 451 4.3.0) and nothing of that message exists afterwards.
- `claim_due` hands out due QUEUED recipients (next_attempt_at <= now, no live lease) under a lease
  owned by one node, oldest first, bounded by `limit` recipients; a lease that is not renewed expires and
  the recipients become claimable again (a node that died loses its work to the others).
- `record` writes outcomes for claimed recipients in ONE commit together with any DSN messages owed, so
  "bounced" never exists without its DSN. It raises LeaseLost, writing nothing, when the lease is gone.
- A recipient leaves the queue only as DELIVERED (the primary said 250), or BOUNCED/EXPIRED (a DSN was
  queued in the same commit, or none was owed: null sender, NOTIFY=NEVER, DSN of a DSN).
- A damaged entry (unreadable envelope, body checksum mismatch) is set aside (`corrupt` in stats and
  `list_corrupt`) and never crashes the caller.
- Memory does not grow with the queue's length: listing pages, claims are bounded, bodies are streamed.
- `put_record` stores a message exactly as another spool holds it (`backupmx spool copy`): ID, arrival,
  every recipient's state, attempts, due time, last reply and hold; leases are not carried over.
- `kv_list` pages through one namespace of the shared state in key order (keyset: `after` the last key
  of the previous page), live items only, at most `limit` per call.

Errors: see backupmx.errors (SpoolError, SpoolFullError, SpoolUnavailable, LeaseLost, NotFound).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from backupmx.model import Envelope, MessageRecord, Outcome, QueueId, RecipientRecord, RecipientState
from backupmx.spool.body import BodyBuffer


@dataclass(frozen=True, slots=True)
class Claim:
    """Due recipients of one message, leased to `owner` until `lease_until`."""

    message: MessageRecord  # the whole message, all recipients (for DSNs and grouping)
    recipients: tuple[RecipientRecord, ...]  # the claimed ones: QUEUED and due
    owner: str
    lease_until: float


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    """One outcome for one claimed recipient."""

    message_id: QueueId
    index: int
    outcome: Outcome | None  # None with `expire=True` for retention expiry
    next_attempt_at: float = 0.0  # for Deferred: when to try again
    expire: bool = False  # mark EXPIRED (retention ran out)
    delay_notified: bool = False  # a delay DSN for this recipient is queued in the same commit


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message the engine queues itself in the same commit as outcomes (a DSN)."""

    envelope: Envelope
    body: bytes


@dataclass(frozen=True, slots=True)
class QueueFilter:
    """Which messages to list. The recipient filters (domain, recipient, state, held_reason) must all
    match the same recipient; the message is listed whole."""

    domain: str | None = None
    recipient: str | None = None  # substring, case-insensitive
    sender: str | None = None  # substring, case-insensitive
    state: RecipientState | None = None
    pending_only: bool = True  # only messages with a recipient not yet delivered/bounced/expired
    kind: str | None = None
    held_reason: str | None = None  # a recipient HELD for this reason ("operator", "recovery-guard")


@dataclass(frozen=True, slots=True)
class KvItem:
    """One live item of the shared state (`kv_list`)."""

    namespace: str
    key: str
    value: bytes
    updated_at: float
    updated_by: str  # the node that wrote it
    expires_at: float | None


KV_LIST_MAX = 1000  # the default and largest page of kv_list


class KvStore(Protocol):
    """The shared-state part of the Spool contract (kv_* below), for the parts that need only that: the
    learned recipients, the emergency inbox's grants and gate."""

    async def kv_get(self, namespace: str, key: str) -> bytes | None: ...

    async def kv_put(
        self, namespace: str, key: str, value: bytes, *, expires_at: float | None = None, now: float | None = None
    ) -> None: ...

    async def kv_delete(self, namespace: str, key: str) -> bool: ...

    async def kv_list(
        self, namespace: str, *, prefix: str = "", after: str | None = None, limit: int = KV_LIST_MAX
    ) -> Sequence[KvItem]: ...


@dataclass(frozen=True, slots=True)
class DomainStats:
    domain: str
    by_state: dict[str, int] = field(default_factory=dict)  # recipients per RecipientState value
    messages_pending: int = 0
    oldest_pending_at: float | None = None  # received_at of the oldest pending message
    held_by_reason: dict[str, int] = field(default_factory=dict)  # HELD recipients per reason ("poison" ...)
    held_since: dict[str, float] = field(default_factory=dict)  # per reason: when the longest-held was held


@dataclass(frozen=True, slots=True)
class SpoolStats:
    messages_pending: int
    recipients_by_state: dict[str, int]
    domains: tuple[DomainStats, ...]
    oldest_pending_at: float | None
    corrupt: int
    bytes_on_disk: int


@dataclass(frozen=True, slots=True)
class OutagePeriod:
    domain: str
    started_at: float
    ended_at: float | None  # None while the outage is declared


@dataclass(frozen=True, slots=True)
class SpoolStatistics:
    """A snapshot of the spool's own work (for metrics and tests), not of the queue's content."""

    commits: int = 0  # transactions committed (one fsync each)
    groups: int = 0  # transactions attempted (commits + failed/split ones)
    operations: int = 0  # write operations finished (puts, claims, outcomes, operator actions)
    puts: int = 0  # messages committed (puts and DSNs queued by record)
    failed_operations: int = 0
    largest_group: int = 0  # most operations in one transaction
    split_groups: int = 0  # groups whose commit failed and whose operations were retried one by one


class Spool(Protocol):
    async def open(self) -> None:
        """Create or migrate the schema; start the writer. Idempotent."""
        ...

    async def close(self) -> None: ...

    def statistics(self) -> SpoolStatistics:
        """Counters of the spool's own work: commits, group sizes (group commit is observable)."""
        ...

    # -- accept path -------------------------------------------------------------------------------
    async def put(self, envelope: Envelope, body: BodyBuffer, *, now: float | None = None) -> QueueId:
        """COMMIT POINT. Returns the queue ID once committed. The body is the full stored message
        (Received header included). The ID must be what the Received header already names: pass it in
        via `put_with_id` when the caller chose it."""
        ...

    async def put_with_id(
        self, queue_id: QueueId, envelope: Envelope, body: BodyBuffer, *, now: float | None = None
    ) -> QueueId: ...

    async def put_record(self, message: MessageRecord, body: BodyBuffer) -> None:
        """Store `message` exactly (ID, arrival, every recipient's state, attempts, next attempt, last
        reply, hold) with `body`, for a copy between spools. Raises SpoolError when the ID is taken or
        the body's size is not the record's."""
        ...

    # -- delivery path -----------------------------------------------------------------------------
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
        """Lease up to `limit` due recipients, grouped by message, oldest message first.
        `domains` restricts to recipients of those domains (None = any)."""
        ...

    async def renew(self, claims: Sequence[Claim], *, now: float, lease_seconds: float) -> None:
        """Extend the lease while a delivery runs. Raises LeaseLost if any lease was taken over."""
        ...

    async def claim_held(
        self, message_id: QueueId, *, reason: str, owner: str, lease_seconds: float, now: float
    ) -> Claim | None:
        """Lease the recipients of `message_id` HELD for `reason` (none under a live lease), so that
        `record` can give them an outcome (expiry at the retention cap, with its DSN); they stay HELD
        meanwhile. None when there are none."""
        ...

    async def release(self, claims: Sequence[Claim], *, due: Sequence[float] | None = None) -> None:
        """Give leases back without an outcome (shutdown, destination went DOWN before an attempt).
        `due`, aligned with `claims`: each claim's recipients become due then (no attempt counted), so
        a sweep that looked at them moves on to others; None keeps their due time."""
        ...

    async def record(
        self, owner: str, updates: Sequence[RecipientUpdate], new_messages: Sequence[NewMessage] = (), *, now: float
    ) -> list[QueueId]:
        """Write outcomes and queue DSNs in ONE commit; returns the IDs of the new messages.
        Deferred -> QUEUED with attempts+1 and next_attempt_at; Deferred(guard_hold) -> HELD
        ("recovery-guard"); Delivered -> DELIVERED; Bounced -> BOUNCED; expire -> EXPIRED.
        Clears the lease. Raises LeaseLost (nothing written) when `owner` no longer holds a lease."""
        ...

    async def read_body(self, message_id: QueueId) -> bytes:
        """The stored body. Raises NotFound; a checksum mismatch sets the entry aside and raises
        SpoolError."""
        ...

    def iter_body(self, message_id: QueueId, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The stored body in chunks of at most `chunk_size` bytes, never the whole body in memory:
        delivery streams every body to the primary this way. Raises NotFound (also when the message
        is deleted while it is read); a damaged body raises SpoolError, at the latest after its last
        chunk, so a relay sends the final dot only once this iterator has ended cleanly. A reader may
        stop early: it holds nothing (no lock, no transaction) between chunks."""
        ...

    async def next_due_at(self, *, domains: Sequence[str] | None = None) -> float | None:
        """The earliest next_attempt_at among QUEUED recipients (None when nothing is queued)."""
        ...

    # -- operator actions (CLI, API); they work while `serve` runs --------------------------------
    async def hold(
        self,
        message_id: QueueId | None,
        *,
        reason: str = "operator",
        domain: str | None = None,
        now: float | None = None,
    ) -> int:
        """QUEUED -> HELD for one message (None = all, or all of `domain`). Returns recipients changed."""
        ...

    async def release_held(
        self,
        message_id: QueueId | None,
        *,
        domain: str | None = None,
        reason: str | None = None,
        now: float | None = None,
    ) -> int:
        """HELD -> QUEUED, due now. `reason` restricts to holds of that reason ("recovery-guard")."""
        ...

    async def delete(self, message_id: QueueId) -> bool: ...

    async def flush(self, domain: str | None = None, *, now: float | None = None) -> int:
        """Make every QUEUED recipient (of `domain`) due now. Returns recipients changed."""
        ...

    async def purge(self, *, before: float, limit: int = 10_000) -> int:
        """Delete up to `limit` finished messages (every recipient DELIVERED/BOUNCED/EXPIRED) whose
        last change is older than `before`, bodies included. Returns how many were deleted."""
        ...

    # -- reading -----------------------------------------------------------------------------------
    async def get(self, message_id: QueueId) -> MessageRecord | None: ...

    async def list_messages(
        self, flt: QueueFilter = QueueFilter(), *, limit: int = 100, after: QueueId | None = None
    ) -> list[MessageRecord]:
        """A page, in arrival order, of messages whose ID is greater than `after`."""
        ...

    async def count_pending(self, *, include_kinds: Sequence[str] = ("user", "dsn")) -> int:
        """Messages with any recipient not yet delivered/bounced/expired."""
        ...

    async def stats(self) -> SpoolStats: ...

    async def list_corrupt(self) -> list[tuple[QueueId, str]]: ...

    # -- outages (retention pauses while one is declared) -------------------------------------------
    async def outage_started(self, domain: str, at: float) -> None:
        """Declare an outage of `domain`'s primary (no-op if one is already open)."""
        ...

    async def outage_ended(self, domain: str, at: float) -> None: ...

    async def outages(self, domain: str | None = None, *, since: float = 0.0) -> list[OutagePeriod]: ...

    # -- shared state for the other parts (canary results, drill requests and reports) ---------------
    async def kv_get(self, namespace: str, key: str) -> bytes | None:
        """The value under (namespace, key), or None (also when it has expired)."""
        ...

    async def kv_put(
        self, namespace: str, key: str, value: bytes, *, expires_at: float | None = None, now: float | None = None
    ) -> None:
        """Set (namespace, key) to `value`, committed (every node of a shared spool sees it)."""
        ...

    async def kv_delete(self, namespace: str, key: str) -> bool:
        """Remove (namespace, key); True when it existed."""
        ...

    async def kv_list(
        self, namespace: str, *, prefix: str = "", after: str | None = None, limit: int = KV_LIST_MAX
    ) -> list[KvItem]:
        """A page of the live items of `namespace` whose key starts with `prefix`, in key order, keys
        greater than `after` (None: from the start); at most `limit` (capped at KV_LIST_MAX)."""
        ...


__all__ = [
    "KV_LIST_MAX",
    "BodyBuffer",
    "Claim",
    "DomainStats",
    "KvItem",
    "KvStore",
    "NewMessage",
    "OutagePeriod",
    "QueueFilter",
    "RecipientUpdate",
    "Spool",
    "SpoolStatistics",
    "SpoolStats",
]
