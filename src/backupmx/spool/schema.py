"""The SQLite spool's schema and its migrations, keyed by `PRAGMA user_version`.

Counters that must answer at once with a million messages queued (pending messages per kind,
recipients per domain and state, pending messages per domain) are kept by triggers in the same
transaction as the rows they count, so they cannot drift. `migrate` is idempotent and safe while
another process (a running `serve`) uses the database: it takes the write lock before looking.
"""

from __future__ import annotations

import sqlite3

from backupmx.errors import SpoolUnavailable

SCHEMA_VERSION = 3

# A recipient is "pending" (the message still needs us) while QUEUED or HELD.
_PENDING = "('queued','held')"

_V1 = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS messages (
    id             TEXT PRIMARY KEY,          -- queue ID: fixed width, sorts by arrival
    sender         TEXT NOT NULL,
    kind           TEXT NOT NULL,
    size           INTEGER NOT NULL,
    received_at    REAL NOT NULL,
    envelope_json  TEXT NOT NULL,
    checksum       TEXT NOT NULL,             -- "crc32:xxxxxxxx" of the body
    pending        INTEGER NOT NULL,          -- 1 while any recipient is queued or held (triggers)
    corrupt_reason TEXT,                      -- set aside: never claimed
    corrupt_at     REAL
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS messages_pending ON messages(id) WHERE pending = 1;
CREATE INDEX IF NOT EXISTS messages_corrupt ON messages(id) WHERE corrupt_reason IS NOT NULL;

-- A rowid table: incremental blob I/O (blobopen) addresses rows by rowid.
CREATE TABLE IF NOT EXISTS bodies (
    rowid      INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    data       BLOB NOT NULL
);

CREATE TABLE IF NOT EXISTS recipients (
    message_id      TEXT NOT NULL,
    idx             INTEGER NOT NULL,
    address         TEXT NOT NULL,
    domain          TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_attempt_at REAL,
    last_reply      TEXT,
    held_reason     TEXT,
    notify          TEXT,                     -- "SUCCESS,FAILURE" / "NEVER" / NULL
    orcpt           TEXT,
    delay_notified  INTEGER NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_until     REAL,
    updated_at      REAL NOT NULL,
    PRIMARY KEY (message_id, idx)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS rcpt_due ON recipients(state, next_attempt_at, message_id);
CREATE INDEX IF NOT EXISTS rcpt_domain_due ON recipients(domain, state, next_attempt_at, message_id);
CREATE INDEX IF NOT EXISTS rcpt_domain_pending ON recipients(domain, message_id)
    WHERE state IN {_PENDING};
CREATE INDEX IF NOT EXISTS rcpt_leased ON recipients(lease_until) WHERE lease_until IS NOT NULL;

CREATE TABLE IF NOT EXISTS outages (
    domain     TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at   REAL
);
CREATE INDEX IF NOT EXISTS outages_domain ON outages(domain, started_at);

-- Counters, kept by the triggers below.
CREATE TABLE IF NOT EXISTS msg_counts (     -- pending, not corrupt, messages per kind
    kind    TEXT PRIMARY KEY,
    pending INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rcpt_counts (    -- recipients per domain and state
    domain TEXT NOT NULL,
    state  TEXT NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (domain, state)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dom_pending (    -- messages with a pending recipient of the domain
    domain   TEXT PRIMARY KEY,
    messages INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TRIGGER IF NOT EXISTS msg_ins AFTER INSERT ON messages
WHEN new.pending = 1 AND new.corrupt_reason IS NULL
BEGIN
    INSERT INTO msg_counts(kind, pending) VALUES (new.kind, 1)
        ON CONFLICT(kind) DO UPDATE SET pending = pending + 1;
END;

CREATE TRIGGER IF NOT EXISTS msg_del AFTER DELETE ON messages
WHEN old.pending = 1 AND old.corrupt_reason IS NULL
BEGIN
    UPDATE msg_counts SET pending = pending - 1 WHERE kind = old.kind;
END;

CREATE TRIGGER IF NOT EXISTS msg_upd AFTER UPDATE OF pending, corrupt_reason ON messages
WHEN (old.pending = 1 AND old.corrupt_reason IS NULL) != (new.pending = 1 AND new.corrupt_reason IS NULL)
BEGIN
    INSERT INTO msg_counts(kind, pending)
        VALUES (new.kind, CASE WHEN new.pending = 1 AND new.corrupt_reason IS NULL THEN 1 ELSE -1 END)
        ON CONFLICT(kind) DO UPDATE SET pending = pending + excluded.pending;
END;

CREATE TRIGGER IF NOT EXISTS rcpt_ins AFTER INSERT ON recipients
BEGIN
    INSERT INTO rcpt_counts(domain, state, n) VALUES (new.domain, new.state, 1)
        ON CONFLICT(domain, state) DO UPDATE SET n = n + 1;
    INSERT INTO dom_pending(domain, messages)
        SELECT new.domain, 1
        WHERE new.state IN {_PENDING} AND NOT EXISTS (
            SELECT 1 FROM recipients r WHERE r.message_id = new.message_id AND r.domain = new.domain
            AND r.state IN {_PENDING} AND r.idx != new.idx)
        ON CONFLICT(domain) DO UPDATE SET messages = messages + 1;
END;

CREATE TRIGGER IF NOT EXISTS rcpt_del AFTER DELETE ON recipients
BEGIN
    UPDATE rcpt_counts SET n = n - 1 WHERE domain = old.domain AND state = old.state;
    UPDATE dom_pending SET messages = messages - 1
        WHERE domain = old.domain AND old.state IN {_PENDING} AND NOT EXISTS (
            SELECT 1 FROM recipients r WHERE r.message_id = old.message_id AND r.domain = old.domain
            AND r.state IN {_PENDING});
    UPDATE messages SET pending = EXISTS (
            SELECT 1 FROM recipients r WHERE r.message_id = old.message_id AND r.state IN {_PENDING})
        WHERE id = old.message_id AND old.state IN {_PENDING};
END;

CREATE TRIGGER IF NOT EXISTS rcpt_upd_state AFTER UPDATE OF state ON recipients
WHEN old.state != new.state
BEGIN
    UPDATE rcpt_counts SET n = n - 1 WHERE domain = old.domain AND state = old.state;
    INSERT INTO rcpt_counts(domain, state, n) VALUES (new.domain, new.state, 1)
        ON CONFLICT(domain, state) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER IF NOT EXISTS rcpt_upd_pending AFTER UPDATE OF state ON recipients
WHEN (old.state IN {_PENDING}) != (new.state IN {_PENDING})
BEGIN
    UPDATE dom_pending SET messages = messages - 1
        WHERE domain = new.domain AND old.state IN {_PENDING} AND NOT EXISTS (
            SELECT 1 FROM recipients r WHERE r.message_id = new.message_id AND r.domain = new.domain
            AND r.state IN {_PENDING});
    INSERT INTO dom_pending(domain, messages)
        SELECT new.domain, 1
        WHERE new.state IN {_PENDING} AND NOT EXISTS (
            SELECT 1 FROM recipients r WHERE r.message_id = new.message_id AND r.domain = new.domain
            AND r.state IN {_PENDING} AND r.idx != new.idx)
        ON CONFLICT(domain) DO UPDATE SET messages = messages + 1;
    UPDATE messages SET pending = EXISTS (
            SELECT 1 FROM recipients r WHERE r.message_id = new.message_id AND r.state IN {_PENDING})
        WHERE id = new.message_id;
END;

-- The domain and the key of a recipient never change; the counters rely on it.
CREATE TRIGGER IF NOT EXISTS rcpt_fixed BEFORE UPDATE OF message_id, idx, domain ON recipients
WHEN old.message_id != new.message_id OR old.idx != new.idx OR old.domain != new.domain
BEGIN
    SELECT RAISE(ABORT, 'recipient key and domain are immutable');
END;
"""

# Shared state for the other parts of backupmx (canary results, drill requests and reports): one row per
# (namespace, key), the same table as PostgreSQL's (pg_schema.py).
_V2 = """
CREATE TABLE IF NOT EXISTS kv (
    namespace  TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      BLOB NOT NULL,
    updated_at REAL NOT NULL,
    updated_by TEXT NOT NULL,
    expires_at REAL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
"""

# Version 3:
# - the counting triggers again, their subqueries pinned to the primary key (message_id, idx): with no
#   statistics the planner preferred rcpt_domain_due (domain, state) and scanned a domain's whole queue on
#   every insert, so a put cost O(queue length). The unary "+" keeps a column out of index choice;
# - messages.finished_at (when the last recipient became final), so purge finds old finished mail by index;
# - recipients (domain, message_id), so listing one domain pages through that domain only, and the held
#   recipients by message (a partial index: nothing to maintain for queued mail), for the held lists.
_V3 = f"""
ALTER TABLE messages ADD COLUMN finished_at REAL;
UPDATE messages SET finished_at = (SELECT max(r.updated_at) FROM recipients r WHERE r.message_id = messages.id)
    WHERE pending = 0;
CREATE INDEX IF NOT EXISTS messages_finished ON messages(finished_at) WHERE pending = 0;
CREATE INDEX IF NOT EXISTS rcpt_domain_msg ON recipients(domain, message_id);
CREATE INDEX IF NOT EXISTS rcpt_held ON recipients(message_id, held_reason) WHERE state = 'held';

DROP TRIGGER IF EXISTS rcpt_ins;
DROP TRIGGER IF EXISTS rcpt_del;
DROP TRIGGER IF EXISTS rcpt_upd_pending;

CREATE TRIGGER rcpt_ins AFTER INSERT ON recipients
BEGIN
    INSERT INTO rcpt_counts(domain, state, n) VALUES (new.domain, new.state, 1)
        ON CONFLICT(domain, state) DO UPDATE SET n = n + 1;
    INSERT INTO dom_pending(domain, messages)
        SELECT new.domain, 1
        WHERE new.state IN {_PENDING} AND NOT EXISTS (
            SELECT 1 FROM recipients r WHERE r.message_id = new.message_id AND +r.domain = new.domain
            AND +r.state IN {_PENDING} AND r.idx != new.idx)
        ON CONFLICT(domain) DO UPDATE SET messages = messages + 1;
END;

CREATE TRIGGER rcpt_del AFTER DELETE ON recipients
BEGIN
    UPDATE rcpt_counts SET n = n - 1 WHERE domain = old.domain AND state = old.state;
    UPDATE dom_pending SET messages = messages - 1
        WHERE domain = old.domain AND old.state IN {_PENDING} AND NOT EXISTS (
            SELECT 1 FROM recipients r WHERE r.message_id = old.message_id AND +r.domain = old.domain
            AND +r.state IN {_PENDING});
    UPDATE messages SET pending = EXISTS (
            SELECT 1 FROM recipients r WHERE r.message_id = old.message_id AND +r.state IN {_PENDING}),
            finished_at = old.updated_at
        WHERE id = old.message_id AND old.state IN {_PENDING};
END;

CREATE TRIGGER rcpt_upd_pending AFTER UPDATE OF state ON recipients
WHEN (old.state IN {_PENDING}) != (new.state IN {_PENDING})
BEGIN
    UPDATE dom_pending SET messages = messages - 1
        WHERE domain = new.domain AND old.state IN {_PENDING} AND NOT EXISTS (
            SELECT 1 FROM recipients r WHERE r.message_id = new.message_id AND +r.domain = new.domain
            AND +r.state IN {_PENDING});
    INSERT INTO dom_pending(domain, messages)
        SELECT new.domain, 1
        WHERE new.state IN {_PENDING} AND NOT EXISTS (
            SELECT 1 FROM recipients r WHERE r.message_id = new.message_id AND +r.domain = new.domain
            AND +r.state IN {_PENDING} AND r.idx != new.idx)
        ON CONFLICT(domain) DO UPDATE SET messages = messages + 1;
    -- finished_at means something only once pending = 0 (final states are final: it is set last then).
    UPDATE messages SET pending = EXISTS (
            SELECT 1 FROM recipients r WHERE r.message_id = new.message_id AND +r.state IN {_PENDING}),
            finished_at = new.updated_at
        WHERE id = new.message_id;
END;
"""

_MIGRATIONS: dict[int, str] = {1: _V1, 2: _V2, 3: _V3}


def user_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION. `conn` must be in autocommit mode (isolation_level=None)."""
    if user_version(conn) == SCHEMA_VERSION:
        return  # the cheap path for a CLI opening beside a running server
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = user_version(conn)  # again, under the write lock
        if current > SCHEMA_VERSION:
            raise SpoolUnavailable(
                f"spool schema version {current} is newer than this backupmx understands ({SCHEMA_VERSION})"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _split(_MIGRATIONS[version]):
                _execute_idempotent(conn, statement)
            conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _execute_idempotent(conn: sqlite3.Connection, statement: str) -> None:
    """Run one migration statement; ADD COLUMN of a column that exists is a no-op, like the
    IF NOT EXISTS of the other statements (a half-migrated or hand-repaired file migrates again)."""
    try:
        conn.execute(statement)
    except sqlite3.OperationalError as exc:
        if "ADD COLUMN" in statement.upper() and "duplicate column name" in str(exc):
            return
        raise


def _split(script: str) -> list[str]:
    """Statements of a script (executescript would COMMIT our transaction), triggers kept whole."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        stripped = line.split("--", 1)[0].strip()
        buf += line
        if stripped.endswith(";") and sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out
