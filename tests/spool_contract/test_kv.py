"""Shared state (kv): what the canary and the drill keep in the spool, the same on every backend."""

from __future__ import annotations

from backupmx.clock import FakeClock
from backupmx.spool import KV_LIST_MAX, Spool
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


async def test_another_spool_object_on_the_same_store_sees_it(backend: Backend, spool: Spool, clock: FakeClock) -> None:
    await spool.kv_put("canary", "n1/example.test", bytes(range(256)))
    other = await backend.make(clock)
    try:
        assert await other.kv_get("canary", "n1/example.test") == bytes(range(256))
    finally:
        await other.close()


async def test_list_pages_by_key_within_a_prefix(spool: Spool) -> None:
    for key in ["b.test/zed", "a.test/bob", "a.test/alice", "a.test0", "a.tesu/x", "a.test/carol"]:
        await spool.kv_put("learned", key, key.encode())
    await spool.kv_put("other", "a.test/alice", b"elsewhere")  # namespaces are apart
    everything = await spool.kv_list("learned")
    assert [i.key for i in everything] == [
        "a.test/alice",
        "a.test/bob",
        "a.test/carol",
        "a.test0",
        "a.tesu/x",
        "b.test/zed",
    ]
    first = everything[0]
    assert (first.namespace, first.value, first.expires_at) == ("learned", b"a.test/alice", None)
    assert first.updated_by  # the node that wrote it
    page = await spool.kv_list("learned", prefix="a.test/", limit=2)
    assert [i.key for i in page] == ["a.test/alice", "a.test/bob"]
    page = await spool.kv_list("learned", prefix="a.test/", after=page[-1].key, limit=2)
    assert [i.key for i in page] == ["a.test/carol"]
    assert await spool.kv_list("learned", prefix="a.test/", after="a.test/carol") == []
    # `after` before the prefix starts at the prefix; a prefix with no keys lists nothing
    assert [i.key for i in await spool.kv_list("learned", prefix="b.test/", after="a")] == ["b.test/zed"]
    assert await spool.kv_list("learned", prefix="c.test/") == []
    assert await spool.kv_list("learned", limit=0) == []


async def test_list_leaves_out_expired_items(spool: Spool, clock: FakeClock) -> None:
    await spool.kv_put("drill", "a", b"1", expires_at=clock.now() + 10)
    await spool.kv_put("drill", "b", b"2")
    assert [i.key for i in await spool.kv_list("drill")] == ["a", "b"]
    clock.advance(11)
    assert [i.key for i in await spool.kv_list("drill")] == ["b"]


async def test_list_is_bounded(spool: Spool) -> None:
    for n in range(KV_LIST_MAX + 5):
        await spool.kv_put("many", f"k{n:05d}", b"")
    page = await spool.kv_list("many", limit=KV_LIST_MAX * 10)
    assert len(page) == KV_LIST_MAX
    rest = await spool.kv_list("many", after=page[-1].key)
    assert [i.key for i in rest] == [f"k{n:05d}" for n in range(KV_LIST_MAX, KV_LIST_MAX + 5)]
