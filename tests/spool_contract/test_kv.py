"""Shared state (kv): what the canary and the drill keep in the spool, the same on every backend."""

from __future__ import annotations

from backupmx.clock import FakeClock
from backupmx.spool import Spool
from tests.spool_contract.conftest import Backend


async def test_put_get_overwrite_delete(spool: Spool) -> None:
    assert await spool.kv_get("drill", "report/example.test") is None
    await spool.kv_put("drill", "report/example.test", b'{"n": 1}')
    assert await spool.kv_get("drill", "report/example.test") == b'{"n": 1}'
    assert await spool.kv_get("canary", "report/example.test") is None  # namespaces are apart
    await spool.kv_put("drill", "report/example.test", b'{"n": 2}')
    assert await spool.kv_get("drill", "report/example.test") == b'{"n": 2}'
    assert await spool.kv_delete("drill", "report/example.test") is True
    assert await spool.kv_delete("drill", "report/example.test") is False
    assert await spool.kv_get("drill", "report/example.test") is None


async def test_an_expired_value_is_gone(spool: Spool, clock: FakeClock) -> None:
    await spool.kv_put("drill", "request/n1/example.test", b"x", expires_at=clock.now() + 10)
    assert await spool.kv_get("drill", "request/n1/example.test") == b"x"
    clock.advance(11)
    assert await spool.kv_get("drill", "request/n1/example.test") is None


async def test_another_spool_object_on_the_same_store_sees_it(backend: Backend, spool: Spool,
                                                             clock: FakeClock) -> None:
    await spool.kv_put("canary", "n1/example.test", bytes(range(256)))
    other = await backend.make(clock)
    try:
        assert await other.kv_get("canary", "n1/example.test") == bytes(range(256))
    finally:
        await other.close()
