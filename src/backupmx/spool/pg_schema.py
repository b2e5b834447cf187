"""The PostgreSQL spool's schema and its migrations, versioned in `backupmx.meta('schema_version')`.

Everything lives in its own PostgreSQL schema, `backupmx`, so the spool can share a database with
other applications. `migrate` is idempotent and safe while other nodes run: it takes a transaction-level
advisory lock first, so two nodes starting together migrate once. It refuses a schema newer than this
code. Counters the dashboard reads with a million messages queued are kept by triggers, as deltas on
rows sharded by node (`backupmx.shard`), so nodes never wait for each other on a counter row.
"""

from __future__ import annotations

from typing import Any

from backupmx.errors import SpoolUnavailable

SCHEMA = "backupmx"
SCHEMA_VERSION = 2
MIGRATION_LOCK = 0x62_6D78_7370_6F6F  # "bmxspoo": one advisory lock id for every migration

# A recipient is "pending" (the message still needs us) while QUEUED or HELD.
_PENDING = "('queued','held')"


def _rcpt_upd(*, finished_at: bool) -> str:
    """The statement trigger that moves the counters when recipients change state (v1), and from v2 on
    also stamps messages.finished_at with the last recipient's updated_at. One text for both versions, so
    the migration differs only where the schema did."""
    updated_at = ", n.updated_at" if finished_at else ""
    set_finished = (
        ",\n                          finished_at = CASE WHEN m.pending_rcpts + x.d = 0 THEN x.at END"
        if finished_at
        else ""
    )
    at = ", max(updated_at) AS at" if finished_at else ""
    return f"""CREATE OR REPLACE FUNCTION rcpt_upd() RETURNS trigger LANGUAGE plpgsql
SET search_path = {SCHEMA}, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM old_rows o JOIN new_rows n ON n.message_id = o.message_id AND n.idx = o.idx
                   WHERE o.state <> n.state) THEN
        RETURN NULL;  -- leases, attempts, replies: no counter moves
    END IF;
    WITH c AS (
        SELECT o.message_id, o.domain, o.state AS old_state, n.state AS new_state{updated_at},
               CASE WHEN (o.state IN {_PENDING}) = (n.state IN {_PENDING}) THEN 0
                    WHEN n.state IN {_PENDING} THEN 1 ELSE -1 END AS d
        FROM old_rows o JOIN new_rows n ON n.message_id = o.message_id AND n.idx = o.idx
        WHERE o.state <> n.state
    ), counts AS (
        INSERT INTO rcpt_counts (shard, domain, state, n)
            SELECT shard(), domain, state, sum(d) FROM (
                SELECT domain, old_state AS state, -1 AS d FROM c
                UNION ALL
                SELECT domain, new_state, 1 FROM c) x
            GROUP BY domain, state
            ON CONFLICT (shard, domain, state) DO UPDATE SET n = rcpt_counts.n + excluded.n
    ), per_domain AS (
        UPDATE msg_domains md SET pending = md.pending + x.d
            FROM (SELECT message_id, domain, sum(d) AS d FROM c GROUP BY message_id, domain) x
            WHERE md.message_id = x.message_id AND md.domain = x.domain AND x.d <> 0
    )
    UPDATE messages m SET pending_rcpts = m.pending_rcpts + x.d{set_finished}
        FROM (SELECT message_id, sum(d) AS d{at} FROM c GROUP BY message_id) x
        WHERE m.id = x.message_id AND x.d <> 0;
    RETURN NULL;
END $$;
"""


def _count_pending(*, function: str, counts: str, key: str, pending: str) -> str:
    """A row trigger that moves `counts` (per shard and `key`) by one when its row starts or stops being
    pending (`pending`, with {row} for OLD or NEW): messages per kind, messages per domain."""
    was, now_ = pending.format(row="OLD"), pending.format(row="NEW")
    return f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql
SET search_path = {SCHEMA}, pg_temp AS $$
DECLARE
    was boolean := TG_OP <> 'INSERT' AND {was};
    now_ boolean := TG_OP <> 'DELETE' AND {now_};
BEGIN
    IF was <> now_ THEN
        INSERT INTO {counts} (shard, {key}, n)
            VALUES (shard(), CASE WHEN TG_OP = 'DELETE' THEN OLD.{key} ELSE NEW.{key} END,
                    CASE WHEN now_ THEN 1 ELSE -1 END)
            ON CONFLICT (shard, {key}) DO UPDATE SET n = {counts}.n + excluded.n;
    END IF;
    RETURN NULL;
END $$;
"""


_V1 = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- Shared state for the other parts of backupmx (learned recipients, metrics series, drill reports):
-- one row per (namespace, key). See docs/many-nodes.md for the namespaces in use.
CREATE TABLE IF NOT EXISTS kv (
    namespace  text NOT NULL,
    key        text COLLATE "C" NOT NULL,
    value      bytea NOT NULL,
    updated_at double precision NOT NULL,
    updated_by text NOT NULL,
    expires_at double precision,
    PRIMARY KEY (namespace, key)
);
CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL;

-- The nodes that opened this spool, for operators (`seen_at` is refreshed by claims).
CREATE TABLE IF NOT EXISTS nodes (
    name       text PRIMARY KEY,
    host       text NOT NULL,
    pid        integer NOT NULL,
    version    text NOT NULL,
    started_at double precision NOT NULL,
    seen_at    double precision NOT NULL
);

CREATE TABLE IF NOT EXISTS messages (
    id             text COLLATE "C" PRIMARY KEY,   -- queue ID: fixed width, sorts by arrival
    sender         text NOT NULL,
    kind           text NOT NULL,
    size           bigint NOT NULL,
    received_at    double precision NOT NULL,
    received_by    text NOT NULL,                  -- the node that said 250
    envelope_json  text NOT NULL,                  -- text, not jsonb: a damaged one must stay readable
    checksum       text NOT NULL,                  -- "crc32:xxxxxxxx" of the body
    chunks         integer NOT NULL,               -- rows in body_chunks
    pending_rcpts  integer NOT NULL,               -- recipients queued or held (kept by triggers)
    corrupt_reason text,                           -- set aside: never claimed
    corrupt_at     double precision
);
CREATE INDEX IF NOT EXISTS messages_pending ON messages (id) WHERE pending_rcpts > 0;
CREATE INDEX IF NOT EXISTS messages_finished ON messages (id) WHERE pending_rcpts = 0;
CREATE INDEX IF NOT EXISTS messages_corrupt ON messages (id) WHERE corrupt_reason IS NOT NULL;

-- Bodies in chunks of at most 256 KiB, so no message needs its size in memory, here or in the node.
CREATE TABLE IF NOT EXISTS body_chunks (
    message_id text COLLATE "C" NOT NULL,
    seq        integer NOT NULL,
    data       bytea NOT NULL,
    PRIMARY KEY (message_id, seq)
);
DO $$ BEGIN
    ALTER TABLE body_chunks ALTER COLUMN data SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN NULL;
END $$;

-- A large body is written (and committed) before its message row; until then it is an upload.
-- Uploads left behind by a node that died are removed after an hour (PostgresSpool.open, purge).
CREATE TABLE IF NOT EXISTS body_uploads (
    message_id text COLLATE "C" PRIMARY KEY,
    node       text NOT NULL,
    started_at double precision NOT NULL
);

CREATE TABLE IF NOT EXISTS recipients (
    message_id      text COLLATE "C" NOT NULL,
    idx             integer NOT NULL,
    address         text NOT NULL,
    domain          text NOT NULL,
    state           text NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    last_attempt_at double precision,
    last_reply      text,
    held_reason     text,
    notify          text,                          -- "SUCCESS,FAILURE" / "NEVER" / NULL
    orcpt           text,
    delay_notified  boolean NOT NULL DEFAULT false,
    lease_owner     text,
    lease_until     double precision,
    updated_at      double precision NOT NULL,
    PRIMARY KEY (message_id, idx)
);
CREATE INDEX IF NOT EXISTS rcpt_due ON recipients (next_attempt_at, message_id, idx) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS rcpt_domain_due ON recipients (domain, next_attempt_at, message_id, idx)
    WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS rcpt_held ON recipients (domain, held_reason) WHERE state = 'held';
CREATE INDEX IF NOT EXISTS rcpt_leased ON recipients (lease_until) WHERE lease_until IS NOT NULL;

-- Per message and domain: how many recipients are pending (for per-domain message counts).
CREATE TABLE IF NOT EXISTS msg_domains (
    message_id text COLLATE "C" NOT NULL,
    domain     text NOT NULL,
    pending    integer NOT NULL,
    PRIMARY KEY (message_id, domain)
);
CREATE INDEX IF NOT EXISTS msg_domains_pending ON msg_domains (domain, message_id) WHERE pending > 0;

-- Outages of a primary, shared by every node: at most one open period per domain.
CREATE TABLE IF NOT EXISTS outages (
    id         bigserial PRIMARY KEY,
    domain     text NOT NULL,
    started_at double precision NOT NULL,
    ended_at   double precision,
    started_by text NOT NULL,
    ended_by   text
);
CREATE UNIQUE INDEX IF NOT EXISTS outages_open ON outages (domain) WHERE ended_at IS NULL;
CREATE INDEX IF NOT EXISTS outages_domain ON outages (domain, started_at);

-- Counters (deltas; sum over shards to read).
CREATE TABLE IF NOT EXISTS msg_counts (        -- pending, sound messages per kind
    shard text NOT NULL,
    kind  text NOT NULL,
    n     bigint NOT NULL,
    PRIMARY KEY (shard, kind)
);
CREATE TABLE IF NOT EXISTS rcpt_counts (       -- recipients per domain and state
    shard  text NOT NULL,
    domain text NOT NULL,
    state  text NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (shard, domain, state)
);
CREATE TABLE IF NOT EXISTS dom_pending (       -- messages with a pending recipient of the domain
    shard  text NOT NULL,
    domain text NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (shard, domain)
);

CREATE OR REPLACE FUNCTION shard() RETURNS text LANGUAGE sql STABLE AS
$$ SELECT coalesce(nullif(current_setting('backupmx.shard', true), ''), 'default') $$;

-- Recipients: one statement-level trigger per operation, so a bulk hold of a million recipients
-- updates a few counter rows, not a million.
CREATE OR REPLACE FUNCTION rcpt_ins() RETURNS trigger LANGUAGE plpgsql
SET search_path = {SCHEMA}, pg_temp AS $$
BEGIN
    INSERT INTO rcpt_counts (shard, domain, state, n)
        SELECT shard(), domain, state, count(*) FROM new_rows GROUP BY domain, state
        ON CONFLICT (shard, domain, state) DO UPDATE SET n = rcpt_counts.n + excluded.n;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION rcpt_del() RETURNS trigger LANGUAGE plpgsql
SET search_path = {SCHEMA}, pg_temp AS $$
BEGIN
    INSERT INTO rcpt_counts (shard, domain, state, n)
        SELECT shard(), domain, state, -count(*) FROM old_rows GROUP BY domain, state
        ON CONFLICT (shard, domain, state) DO UPDATE SET n = rcpt_counts.n + excluded.n;
    RETURN NULL;
END $$;

-- A state change moves counts between states and, when it crosses pending/final, updates the
-- message's and the (message, domain)'s pending counts. `x = x + delta` is applied to the latest row
-- version under its row lock, so concurrent nodes finishing recipients of one message cannot race.
{_rcpt_upd(finished_at=False)}
{
    _count_pending(
        function="msg_count",
        counts="msg_counts",
        key="kind",
        pending="{row}.pending_rcpts > 0 AND {row}.corrupt_reason IS NULL",
    )
}
{_count_pending(function="dom_count", counts="dom_pending", key="domain", pending="{row}.pending > 0")}
DROP TRIGGER IF EXISTS rcpt_ins ON recipients;
CREATE TRIGGER rcpt_ins AFTER INSERT ON recipients REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rcpt_ins();
DROP TRIGGER IF EXISTS rcpt_del ON recipients;
CREATE TRIGGER rcpt_del AFTER DELETE ON recipients REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rcpt_del();
DROP TRIGGER IF EXISTS rcpt_upd ON recipients;
CREATE TRIGGER rcpt_upd AFTER UPDATE ON recipients REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rcpt_upd();
DROP TRIGGER IF EXISTS msg_count ON messages;
CREATE TRIGGER msg_count AFTER INSERT OR DELETE OR UPDATE OF pending_rcpts, corrupt_reason ON messages
    FOR EACH ROW EXECUTE FUNCTION msg_count();
DROP TRIGGER IF EXISTS dom_count ON msg_domains;
CREATE TRIGGER dom_count AFTER INSERT OR DELETE OR UPDATE OF pending ON msg_domains
    FOR EACH ROW EXECUTE FUNCTION dom_count();
"""

# v2: messages.finished_at (when the last recipient became final, from its updated_at), so purge finds old
# finished mail by index instead of scanning every finished message for its recipients' times.
_V2 = f"""
ALTER TABLE messages ADD COLUMN IF NOT EXISTS finished_at double precision;
UPDATE messages m SET finished_at = coalesce(
        (SELECT max(r.updated_at) FROM recipients r WHERE r.message_id = m.id), m.received_at)
    WHERE m.pending_rcpts = 0 AND m.finished_at IS NULL;
DROP INDEX IF EXISTS messages_finished;
CREATE INDEX IF NOT EXISTS messages_finished_at ON messages (finished_at, id)
    WHERE pending_rcpts = 0 AND corrupt_reason IS NULL;

{_rcpt_upd(finished_at=True)}"""

_MIGRATIONS: dict[int, str] = {1: _V1, 2: _V2}


async def schema_version(conn: Any) -> int:
    """The version recorded in the database (0 when backupmx never ran there). `conn`: asyncpg."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.meta")
    if not exists:
        return 0
    value = await conn.fetchval(f"SELECT value FROM {SCHEMA}.meta WHERE key = 'schema_version'")
    return 0 if value is None else int(value)


async def migrate(conn: Any) -> tuple[int, int]:
    """Bring the schema to SCHEMA_VERSION; returns (version before, version after).
    `conn` is an asyncpg connection outside any transaction."""
    current = await schema_version(conn)
    if current == SCHEMA_VERSION:
        return current, current  # the cheap path for every node start and every CLI call
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        current = await schema_version(conn)  # again, under the lock
        if current > SCHEMA_VERSION:
            raise SpoolUnavailable(
                f"spool schema version {current} is newer than this backupmx understands ({SCHEMA_VERSION})"
            )
        await conn.execute(f"SET LOCAL search_path = {SCHEMA}, pg_temp")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            await conn.execute(_MIGRATIONS[version])
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', $1)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                str(version),
            )
    return current, SCHEMA_VERSION
