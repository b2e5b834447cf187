"""A migration that has shipped never changes: a spool created at v1 and upgraded must end where a new one
does, so the text of each released migration is pinned here (SHA-256). Refactoring the Python that builds
the SQL (templates for the trigger bodies) must leave these unchanged; a new schema is a new version."""

from __future__ import annotations

import hashlib

import pytest

from backupmx.spool import pg_schema, schema

SHIPPED = {
    ("postgresql", 1): "eea120e95eb4cd393e306ac6af39cb6ec5932982144e87654b32db1ab666b515",
    ("postgresql", 2): "2698d66b3a8ff9c7e8e3c7a6c967b3f973afba562ddfd9b9103fde3a22e7f542",
    ("sqlite", 1): "3b225acf35128fd5c3e1f6ecdcf27f85ccf6bf6d751adfe55e8efd19b1d5bc80",
    ("sqlite", 2): "4258ad5fe73f723aa74beeb0b4b9294d4934359ab766bf0d70295861ace71cda",
    ("sqlite", 3): "ce4608683bea964b78beb8586e1cfcd7dc935f2ee476a012c278dd3e14852bb5",
}


@pytest.mark.parametrize(("backend", "version"), sorted(SHIPPED))
def test_shipped_migration_text_is_unchanged(backend: str, version: int) -> None:
    migrations = pg_schema._MIGRATIONS if backend == "postgresql" else schema._MIGRATIONS
    digest = hashlib.sha256(migrations[version].encode()).hexdigest()
    assert digest == SHIPPED[(backend, version)], f"{backend} migration v{version} changed after it shipped"
