"""A real PostgreSQL server for tests, from Debian's binaries, in a temporary directory.

`PostgresServer` runs initdb and pg_ctl (as the `postgres` user when we are root: the server refuses
to run as root), listens on 127.0.0.1 on a free port plus a unix socket in its directory, and can be
stopped and started again on the same data (to show what the spool does while the database is away).
`postgres_server` is one server for the whole test session; `postgres_url` gives each test a fresh,
empty database. Both skip, with the reason, where the binaries are missing.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.ports import free_port
from tests.support.watchdog import Watchdog

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
START_TIMEOUT = 30.0


def find_bindir() -> Path | None:
    """The newest Debian PostgreSQL bin directory with initdb, pg_ctl and psql, or $BACKUPMX_PG_BIN."""
    candidates = [os.environ["BACKUPMX_PG_BIN"]] if os.environ.get("BACKUPMX_PG_BIN") else []
    candidates += sorted(
        glob.glob(PG_BIN_GLOB),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    for c in candidates:
        d = Path(c)
        if all((d / tool).exists() for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            return d
    return None


def unavailable_reason() -> str | None:
    """Why a PostgreSQL server cannot run here, or None when it can."""
    if find_bindir() is None:
        return "PostgreSQL server binaries not found (apt-get install postgresql, or set BACKUPMX_PG_BIN)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    try:
        import asyncpg  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (pip install asyncpg)"
    return None


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, on 127.0.0.1:<free port>."""

    def __init__(self, *, settings: dict[str, str] | None = None, base: Path | None = None) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError(unavailable_reason() or "no PostgreSQL")
        self.bindir = bindir
        # Not under pytest's tmp_path: its parents are 0700 root, and the server runs as `postgres`.
        self.dir = Path(tempfile.mkdtemp(prefix="backupmx-pg-", dir=str(base) if base else None))
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self.log_path = self.dir / "postgres.log"
        self.host = "127.0.0.1"
        self.port = free_port()
        self.user = "postgres"
        self.settings = {
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": "200",
            "shared_buffers": "128MB",
            "fsync": "on",
            "synchronous_commit": "on",
            "log_min_messages": "warning",
            "log_min_error_statement": "panic",
            **(settings or {}),
        }
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            self._run_as = ["runuser", "-u", "postgres", "--"]
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.socket_dir.mkdir()
        if self._run_as:
            pw = pwd.getpwnam("postgres")
            os.chown(self.socket_dir, pw.pw_uid, pw.pw_gid)
        self._counter = itertools.count(1)
        self._watchdog: Watchdog | None = None
        self._free: list[str] = []  # databases emptied after a test, ready for the next one
        self._initialized = False

    # -- life cycle ---------------------------------------------------------------------------------
    def _tool(
        self, name: str, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [*self._run_as, str(self.bindir / name), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(self.dir),
        )
        if check and res.returncode != 0:
            raise RuntimeError(
                f"{name} {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n{self.log()[-3000:]}"
            )
        return res

    def initdb(self) -> None:
        self._tool(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            self.user,
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "-N",
            "--no-instructions",
        )
        with open(self.data / "postgresql.auto.conf", "a") as f:
            for k, v in self.settings.items():
                f.write(f"{k} = '{v}'\n")
        self._initialized = True

    def start(self) -> PostgresServer:
        if not self._initialized:
            self.initdb()
        if self._watchdog is None:  # if this process dies without close(), the server goes with it
            self._watchdog = Watchdog(
                'kill -9 "$(head -n 1 "$1/postmaster.pid")"; sleep 1; rm -rf "$2"', str(self.data), str(self.dir)
            )
        self._tool(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "-o",
            f"-p {self.port}",
            "start",
            timeout=START_TIMEOUT + 10,
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" (sessions are ended), or "immediate" (like a crash: no checkpoint)."""
        if self.running():
            self._tool("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop", timeout=60)

    def running(self) -> bool:
        """The postmaster of postmaster.pid is alive (no runuser: its PAM session costs ~0.2s)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._watchdog is not None:
            self._watchdog.disarm()
            self._watchdog = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- databases ----------------------------------------------------------------------------------
    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres", *, timeout: float = 60.0) -> str:
        """Run SQL as the superuser over the unix socket; returns psql's unaligned output."""
        res = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                database,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if res.returncode != 0:
            raise RuntimeError(f"psql: {sql[:200]}: {res.stderr.strip()}")
        return res.stdout

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its URL."""
        name = f"{prefix}_{os.getpid()}_{next(self._counter)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with contextlib.suppress(RuntimeError):
            self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def fresh_database(self) -> str:
        """An empty database: a new one, or one emptied by `recycle_database` (CREATE DATABASE copies
        template1 through the WAL, ~0.3s; emptying one takes ~0.03s)."""
        if self._free:
            return self.url(self._free.pop())
        return self.create_database()

    def recycle_database(self, url: str) -> None:
        """End its sessions and drop every schema in it, then keep it for `fresh_database`."""
        name = url.rsplit("/", 1)[1]
        try:
            self.psql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                f" WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            )
            self.psql(
                "DO $$ DECLARE s record; BEGIN"
                " FOR s IN SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'"
                " AND nspname <> 'information_schema' LOOP"
                " EXECUTE format('DROP SCHEMA %I CASCADE', s.nspname); END LOOP;"
                " CREATE SCHEMA public AUTHORIZATION pg_database_owner; END $$",
                name,
            )
        except RuntimeError:
            self.drop_database(url)
            return
        self._free.append(name)


class PostgresBackend:
    """The contract suite's Backend (tests/spool_contract/conftest.py) on a fresh database."""

    name = "postgres"

    def __init__(self, server: PostgresServer, url: str) -> None:
        self.server = server
        self.url = url
        self.database = url.rsplit("/", 1)[1]

    async def make(self, clock: Any) -> Any:
        from backupmx.spool.postgres import PostgresSpool

        spool = PostgresSpool(self.url, node="test", clock=clock)
        await spool.open()
        return spool

    def corrupt_body(self, message_id: str) -> None:
        flipped = "data"
        for i in range(8):
            flipped = f"set_byte({flipped}, {i}, get_byte(data, {i}) # 255)"
        out = self.server.psql(
            f"UPDATE backupmx.body_chunks SET data = {flipped}"
            f" WHERE message_id = '{message_id}' AND seq = 0 RETURNING 1",
            self.database,
        )
        assert out.strip() == "1", f"no body chunk for {message_id}"

    def corrupt_envelope(self, message_id: str) -> None:
        self.server.psql(
            f"""UPDATE backupmx.messages SET envelope_json = '{{"sender": [broken'"""
            f" WHERE id = '{message_id}'",
            self.database,
        )


def wait_until_accepting(server: PostgresServer, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.psql("SELECT 1")
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# Each fixture is defined under a name of its own (`*_fixture`) and registered under the short name, so a
# test module can import `postgres_url_fixture` (marked noqa F401) and still take `postgres_url` as a
# parameter without shadowing the import. The short names are aliases, for conftest.py files.
_SERVER = pytest.StashKey[PostgresServer]()


@pytest.fixture(scope="session", name="postgres_server")
def postgres_server_fixture(request: pytest.FixtureRequest) -> PostgresServer:
    """One PostgreSQL server for the whole session (skips where it cannot run). Every module that imports
    this fixture gets its own copy of the definition, so the server itself is kept in the session's
    stash and stopped when the session ends."""
    server = request.config.stash.get(_SERVER, None)
    if server is not None:
        return server
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    server = PostgresServer()
    request.config.add_cleanup(server.close)
    server.start()
    request.config.stash[_SERVER] = server
    return server


@pytest.fixture(name="postgres_url")
def postgres_url_fixture(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server, emptied (and kept for reuse) afterwards."""
    if not postgres_server.running():  # a test that stopped it and failed before starting it again
        postgres_server.start()
    url = postgres_server.fresh_database()
    try:
        yield url
    finally:
        postgres_server.recycle_database(url)


@pytest.fixture(name="postgres_backend")
def postgres_backend_fixture(postgres_server: PostgresServer, postgres_url: str) -> PostgresBackend:
    """The contract suite's "postgres" backend: a PostgresSpool on a fresh database."""
    return PostgresBackend(postgres_server, postgres_url)


postgres_server = postgres_server_fixture
postgres_url = postgres_url_fixture
postgres_backend = postgres_backend_fixture
