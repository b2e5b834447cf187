"""The spool contract's backend fixtures (SQLite, and PostgreSQL where a server can run), for the
continuity tests that must hold on every backend (test_grants_backends.py)."""

from tests.spool_contract.conftest import backend, clock, spool  # noqa: F401 (fixtures)
from tests.support.postgres import postgres_backend, postgres_server, postgres_url  # noqa: F401 (fixtures)
