"""pytest fixtures for the Postfix peers in tests/support/postfix.py. Each skips the test (with the
reason) where Debian's postfix or root is missing, and stops and removes what it started. Bring them
into a test module or a conftest.py with an import (`from tests.support.fixtures import ...`) or with
`pytest_plugins = ["tests.support.fixtures"]` in the root conftest.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.postfix import (
    PostfixInstance,
    SmtpSink,
    postfix_unavailable_reason,
    tools_unavailable_reason,
)


def require_postfix() -> None:
    """pytest.skip unless a private PostfixInstance can run here."""
    reason = postfix_unavailable_reason()
    if reason:
        pytest.skip(reason)


def require_postfix_tools() -> None:
    """pytest.skip unless smtp-sink and smtp-source can run here."""
    reason = tools_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def postfix_factory() -> Iterator[Callable[..., PostfixInstance]]:
    """make(role="primary", **PostfixInstance kwargs) -> a started instance; all closed at teardown."""
    require_postfix()
    made: list[PostfixInstance] = []

    def make(role: str = "primary", **kwargs: Any) -> PostfixInstance:
        inst = PostfixInstance(role, **kwargs)
        made.append(inst)
        return inst.start()

    try:
        yield make
    finally:
        for inst in reversed(made):
            inst.close()


@pytest.fixture
def postfix_primary(postfix_factory: Callable[..., PostfixInstance]) -> PostfixInstance:
    """A started primary for example.test: users alice and bob get Maildirs, others 550 5.1.1."""
    return postfix_factory("primary", domain="example.test", users=("alice", "bob"))


@pytest.fixture
def postfix_backup(postfix_factory: Callable[..., PostfixInstance]) -> PostfixInstance:
    """A started Postfix backup MX for example.test whose primary (its `relay`) is a dead port."""
    return postfix_factory("backup", domain="example.test")


@pytest.fixture
def sink_factory() -> Iterator[Callable[..., SmtpSink]]:
    """make(**SmtpSink kwargs) -> a started smtp-sink; all stopped at teardown."""
    require_postfix_tools()
    made: list[SmtpSink] = []

    def make(**kwargs: Any) -> SmtpSink:
        sink = SmtpSink(**kwargs)
        made.append(sink)
        return sink.start()

    try:
        yield make
    finally:
        for sink in reversed(made):
            sink.close()


@pytest.fixture
def smtp_sink(sink_factory: Callable[..., SmtpSink]) -> SmtpSink:
    """A started smtp-sink on a free loopback port, counting messages."""
    return sink_factory()
