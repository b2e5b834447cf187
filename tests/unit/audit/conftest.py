"""Fixtures of the `check` lab (lab.py): one PKI per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.audit.lab import Pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(Path(tmp_path_factory.mktemp("check-pki")))
