"""Fixtures for the one Spool contract suite that every backend must pass.

To add a backend: write a class with the `Backend` shape below (make a spool, damage an entry behind
the spool's back, reach the same store from a second spool object) and add it to BACKENDS. A backend
that cannot run here (no server) should skip in `make`, with the reason.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import pytest

from backupmx.clock import FakeClock
from backupmx.model import QueueId
from backupmx.spool import Spool
from backupmx.spool.sqlite import SqliteSpool
from tests.spool_contract.samples import T0
from tests.support.postgres import postgres_backend, postgres_server, postgres_url  # noqa: F401 (fixtures)


class Backend(Protocol):
    name: str

    async def make(self, clock: FakeClock) -> Spool:
        """A new, opened spool on this backend's store (the same store on every call in one test)."""
        ...

    def corrupt_body(self, message_id: QueueId) -> None:
        """Flip bytes of the stored body, keeping its length (a torn or rotten page)."""
        ...

    def corrupt_envelope(self, message_id: QueueId) -> None:
        """Make the stored envelope unparsable."""
        ...


class SqliteBackend:
    name = "sqlite"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    async def make(self, clock: FakeClock) -> Spool:
        spool = SqliteSpool(self.data_dir, node="test", clock=clock)
        await spool.open()
        return spool

    def _raw(self) -> sqlite3.Connection:
        return sqlite3.connect(self.data_dir / "spool.db", isolation_level=None, timeout=10)

    def corrupt_body(self, message_id: QueueId) -> None:
        conn = self._raw()
        try:
            (data,) = conn.execute("SELECT data FROM bodies WHERE message_id = ?", (message_id,)).fetchone()
            damaged = bytes(b ^ 0xFF for b in data[:8]) + data[8:]
            conn.execute("UPDATE bodies SET data = ? WHERE message_id = ?", (damaged, message_id))
        finally:
            conn.close()

    def corrupt_envelope(self, message_id: QueueId) -> None:
        conn = self._raw()
        try:
            conn.execute("UPDATE messages SET envelope_json = '{\"sender\": [broken' WHERE id = ?", (message_id,))
        finally:
            conn.close()


# The backends the contract suite runs against. PostgreSQL adds "postgres" here.
BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "sqlite": SqliteBackend,
}
# Backends that need a server: name -> the fixture that gives the Backend (it skips, with the reason,
# where the server cannot run). tests/support/postgres.py starts one PostgreSQL per session.
SERVER_BACKENDS: dict[str, str] = {
    "postgres": "postgres_backend",
}


@pytest.fixture(params=sorted([*BACKENDS, *SERVER_BACKENDS]))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param in SERVER_BACKENDS:
        found: Backend = request.getfixturevalue(SERVER_BACKENDS[request.param])
        return found
    return BACKENDS[request.param](tmp_path / "data")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
async def spool(backend: Backend, clock: FakeClock) -> AsyncIterator[Spool]:
    s = await backend.make(clock)
    try:
        yield s
    finally:
        await s.close()
