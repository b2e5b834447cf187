"""The admin API over real HTTP on loopback, against a real SqliteSpool: authentication, reading,
and each action changing the spool as `backupmx queue ...` would."""

from __future__ import annotations

import json
import time
from pathlib import Path

import aiohttp
import pytest

from backupmx.admin.api import AdminServer, openapi_spec
from backupmx.errors import ConfigError
from backupmx.model import QueueId, RecipientState
from backupmx.monitor import DestinationState
from backupmx.spool import QueueFilter
from tests.unit.admin.harness import TOKEN, admin_config, guard_hold, put, running_admin


async def test_without_or_with_a_wrong_token_the_api_answers_401(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        for path in ("/api/status", "/api/domains", "/api/queue", "/api/alerts"):
            async with h.anon.get(h.url + path) as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert (await r.json())["error"]
            async with h.anon.get(h.url + path, headers={"Authorization": "Bearer wrong-token-123456789"}) as r:
                assert r.status == 401
            async with h.anon.get(h.url + path, headers={"Authorization": f"Basic {TOKEN}"}) as r:
                assert r.status == 401
        qid = await put(h.spool, ["a@example.test"])
        for method, path in (
            ("POST", "/api/queue/flush"),
            ("POST", f"/api/queue/{qid}/hold"),
            ("DELETE", f"/api/queue/{qid}"),
            ("PUT", "/api/domains/example.test/reroute"),
        ):
            async with h.anon.request(method, h.url + path, json={"hosts": ["127.0.0.1:9"]}) as r:
                assert r.status == 401, path
        # nothing changed
        m = await h.spool.get(qid)
        assert m is not None and m.recipients[0].state is RecipientState.QUEUED
        assert h.engine.reroutes == {}
        async with h.anon.get(h.url + "/api/status", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200


async def test_healthz_needs_no_token_and_says_ok(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        async with h.anon.get(h.url + "/healthz") as r:
            assert r.status == 200
            assert (await r.json())["status"] == "ok"
        await h.spool.close()  # the spool is gone: a load balancer must hear it
        async with h.anon.get(h.url + "/healthz") as r:
            assert r.status == 503
        await h.spool.open()


async def test_openapi_describes_every_route(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h, h.anon.get(h.url + "/api/openapi.json") as r:
        assert r.status == 200
        spec = await r.json()
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) >= {
        "/healthz",
        "/api/status",
        "/api/domains",
        "/api/domains/{domain}",
        "/api/queue",
        "/api/queue/{id}",
        "/api/queue/{id}/body",
        "/api/domains/{domain}/reroute",
    }
    assert set(spec["paths"]["/api/domains/{domain}/reroute"]) == {"put", "delete"}
    # every $ref resolves
    text = json.dumps(spec)
    for name in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name in spec["components"]["schemas"], name
    assert openapi_spec() == spec


async def test_domain_status_shows_state_outage_held_and_oldest(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        now = time.time()
        h.health.set(
            "example.test", DestinationState.DOWN, since=now - 600, outage_since=now - 600, error="connect refused"
        )
        h.health.set("other.test", DestinationState.UP, since=now - 3600)
        await put(h.spool, ["a@example.test", "b@example.test"], now=now - 300)
        await put(h.spool, ["c@example.test"], now=now - 100)
        q3 = await put(h.spool, ["d@other.test"], now=now - 50)
        await h.spool.hold(q3, now=now)
        doc = await h.get_json("/api/domains")
        by = {d["domain"]: d for d in doc["domains"]}
        ex, ot = by["example.test"], by["other.test"]
        assert ex["primary"]["state"] == "down" and ex["primary"]["last_error"] == "connect refused"
        assert ex["outage"]["declared"] is True and 590 <= ex["outage"]["duration_seconds"] <= 700
        assert ex["recipients"] == {"queued": 3, "held": 0, "guard_held": 0, "pending": 3}
        assert ex["messages_pending"] == 2
        assert 290 <= ex["oldest_age_seconds"] <= 400
        assert ex["drain_eta_seconds"] is None  # primary down, no reroute: not draining
        assert ot["primary"]["state"] == "up" and ot["outage"]["declared"] is False
        assert ot["recipients"]["held"] == 1 and ot["recipients"]["queued"] == 0
        one = await h.get_json("/api/domains/example.test")
        assert one["domain"] == "example.test" and one["outages"] == []
        status = await h.get_json("/api/status")
        assert status["outages_declared"] == ["example.test"]
        assert status["spool"]["messages_pending"] == 3
        async with h.http.get(h.url + "/api/domains/nope.test") as r:
            assert r.status == 404


async def test_queue_list_filters_and_pages(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        ids = [await put(h.spool, [f"u{i}@example.test"], sender=f"s{i}@sender.test") for i in range(7)]
        other = await put(h.spool, ["x@other.test"], sender="boss@corp.test")
        await h.spool.hold(ids[3])
        doc = await h.get_json("/api/queue", params={"domain": "example.test", "limit": "3"})
        assert [m["id"] for m in doc["messages"]] == ids[:3] and doc["next"] == ids[2]
        doc = await h.get_json("/api/queue", params={"domain": "example.test", "limit": "3", "after": doc["next"]})
        assert [m["id"] for m in doc["messages"]] == ids[3:6]
        doc = await h.get_json("/api/queue", params={"domain": "example.test", "limit": "3", "after": doc["next"]})
        assert [m["id"] for m in doc["messages"]] == ids[6:] and doc["next"] is None
        assert [m["id"] for m in (await h.get_json("/api/queue", params={"state": "held"}))["messages"]] == [ids[3]]
        assert [m["id"] for m in (await h.get_json("/api/queue", params={"sender": "BOSS"}))["messages"]] == [other]
        assert [m["id"] for m in (await h.get_json("/api/queue", params={"recipient": "u5@"}))["messages"]] == [ids[5]]
        async with h.http.get(h.url + "/api/queue", params={"state": "lost"}) as r:
            assert r.status == 400


async def test_message_detail_headers_and_body_download(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        body = b"Received: from x\r\nSubject: the subject\r\n folded\r\nFrom: s@sender.test\r\n\r\nline 1\r\n"
        qid = await put(h.spool, ["a@example.test", "b@other.test"], body=body)
        h.maillog.event("queued", qid, to="<a@example.test>,<b@other.test>", nrcpt=2)
        doc = await h.get_json(f"/api/queue/{qid}")
        assert doc["id"] == qid and doc["sender"] == "s@sender.test"
        assert [r["address"] for r in doc["recipients"]] == ["a@example.test", "b@other.test"]
        assert ["Subject", "the subject folded"] in doc["headers"]
        assert doc["envelope"]["client_ip"] == "192.0.2.1"
        assert [e["event"] for e in doc["history"]] == ["queued"]
        async with h.http.get(h.url + f"/api/queue/{qid}/body") as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "message/rfc822"
            assert await r.read() == body
        async with h.http.get(h.url + "/api/queue/0000000000000Z") as r:
            assert r.status == 404


async def test_hold_release_delete_flush_change_the_spool_like_the_cli(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        qid = await put(h.spool, ["a@example.test", "b@example.test"])
        assert (await h.call("POST", f"/api/queue/{qid}/hold")) == {"id": qid, "held": 2}
        m = await h.spool.get(qid)
        assert m is not None and {r.state for r in m.recipients} == {RecipientState.HELD}
        assert {r.held_reason for r in m.recipients} == {"operator"}
        assert (await h.call("POST", f"/api/queue/{qid}/release")) == {"id": qid, "released": 2}
        m = await h.spool.get(qid)
        assert m is not None and {r.state for r in m.recipients} == {RecipientState.QUEUED}
        assert "example.test" in h.engine.wakes  # delivery woken for the released domain

        # flush: a deferred recipient becomes due now
        claims = await h.spool.claim_due(now=time.time(), owner="t", lease_seconds=60, limit=10)
        from backupmx.model import Deferred
        from backupmx.reply import Reply
        from backupmx.spool import RecipientUpdate

        await h.spool.record(
            "t",
            [
                RecipientUpdate(
                    r.message_id, r.index, Deferred(Reply(451, "4.3.0", "later")), next_attempt_at=time.time() + 3600
                )
                for c in claims
                for r in c.recipients
            ],
            now=time.time(),
        )
        assert (await h.call("POST", "/api/domains/example.test/flush")) == {"flushed": 2}
        m = await h.spool.get(qid)
        assert m is not None and all(r.next_attempt_at <= time.time() for r in m.recipients)
        assert (await h.call("POST", "/api/queue/flush")) == {"flushed": 0}

        # hold and release a whole domain
        q2 = await put(h.spool, ["c@other.test"])
        assert (await h.call("POST", "/api/domains/example.test/hold")) == {"held": 2}
        assert (await h.spool.get(q2)).recipients[0].state is RecipientState.QUEUED  # type: ignore[union-attr]
        assert (await h.call("POST", "/api/domains/example.test/release")) == {"released": 2}

        assert (await h.call("DELETE", f"/api/queue/{qid}")) == {"id": qid, "deleted": True}
        assert await h.spool.get(qid) is None
        async with h.http.delete(h.url + f"/api/queue/{qid}") as r:
            assert r.status == 404


async def test_release_only_recovery_guard_holds(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        now = time.time()
        guarded = await put(h.spool, ["a@example.test"], now=now - 10)
        await guard_hold(h.spool, guarded, now=now)
        manual = await put(h.spool, ["b@example.test"])
        await h.spool.hold(manual)
        holds = (await h.get_json("/api/queue/guard-holds"))["holds"]
        assert [(x["id"], x["address"]) for x in holds] == [(guarded, "a@example.test")]
        assert holds[0]["last_reply"].startswith("550 5.1.1")
        doc = await h.get_json("/api/domains/example.test")
        assert doc["recipients"]["held"] == 2 and doc["recipients"]["guard_held"] == 1
        n = await h.call("POST", "/api/domains/example.test/release", json={"reason": "recovery-guard"})
        assert n == {"released": 1}
        assert (await h.spool.get(guarded)).recipients[0].state is RecipientState.QUEUED  # type: ignore[union-attr]
        assert (await h.spool.get(manual)).recipients[0].state is RecipientState.HELD  # type: ignore[union-attr]


async def test_reroute_sets_the_engine_flushes_and_undoes(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        qid = await put(h.spool, ["a@example.test"])
        await h.spool.hold(qid)
        later = await put(h.spool, ["b@example.test"])
        claims = await h.spool.claim_due(now=time.time(), owner="t", lease_seconds=60, limit=10)
        from backupmx.model import Deferred
        from backupmx.reply import Reply
        from backupmx.spool import RecipientUpdate

        await h.spool.record(
            "t",
            [
                RecipientUpdate(
                    r.message_id, r.index, Deferred(Reply(421, "4.4.2", "down")), next_attempt_at=time.time() + 3600
                )
                for c in claims
                for r in c.recipients
            ],
            now=time.time(),
        )
        doc = await h.call(
            "PUT",
            "/api/domains/example.test/reroute",
            json={"hosts": ["127.0.0.1:2600", "[::1]:2601"], "release_held": True},
        )
        assert doc == {
            "domain": "example.test",
            "reroute": ["127.0.0.1:2600", "[::1]:2601"],
            "flushed": 1,
            "released": 1,
        }
        assert h.engine.reroutes == {"example.test": [("127.0.0.1", 2600), ("::1", 2601)]}
        assert "example.test" in h.engine.wakes
        for q in (qid, later):
            r = (await h.spool.get(q)).recipients[0]  # type: ignore[union-attr]
            assert r.state is RecipientState.QUEUED and r.next_attempt_at <= time.time()
        status = await h.get_json("/api/domains/example.test")
        assert status["reroute"] == ["127.0.0.1:2600", "[::1]:2601"]
        saved = await h.spool.kv_get("admin.reroute", "example.test")
        assert saved is not None and json.loads(saved) == ["127.0.0.1:2600", "[::1]:2601"]

        undo = await h.call("DELETE", "/api/domains/example.test/reroute")
        assert undo == {"domain": "example.test", "reroute": None, "was_rerouted": True}
        assert h.engine.reroutes["example.test"] is None
        assert (await h.get_json("/api/domains/example.test"))["reroute"] is None
        assert await h.spool.kv_get("admin.reroute", "example.test") is None


async def test_reroute_refuses_bad_hosts_and_our_own_listener(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        for hosts in ([], ["nonsense:port"], ["127.0.0.1:2525"], ["localhost:2525"], "mx.example.net:99999", [7]):
            async with h.http.put(h.url + "/api/domains/example.test/reroute", json={"hosts": hosts}) as r:
                assert r.status == 400, hosts
                assert (await r.json())["error"].startswith("hosts:")
        async with h.http.put(
            h.url + "/api/domains/example.test/reroute", data=b"not json", headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 400
        assert h.engine.reroutes == {}


async def test_a_reroute_survives_a_restart(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        await h.call("PUT", "/api/domains/other.test/reroute", json={"hosts": ["10.0.0.7:25"]})
    async with running_admin(tmp_path) as h2:
        assert h2.engine.reroutes == {"other.test": [("10.0.0.7", 25)]}
        assert (await h2.get_json("/api/domains/other.test"))["reroute"] == ["10.0.0.7:25"]


async def test_a_reroute_reaches_another_node_of_the_same_spool(tmp_path: Path) -> None:
    cfg_b = admin_config(tmp_path / "data", smtp_listen="127.0.0.1:2526")
    async with running_admin(tmp_path) as a, running_admin(tmp_path / "b", config=cfg_b) as b:
        await a.call("PUT", "/api/domains/example.test/reroute", json={"hosts": ["10.0.0.8:2525"]})
        assert b.engine.reroutes == {}
        await b.server.ops.sync_reroutes()  # what node B's minute loop does
        assert b.engine.reroutes == {"example.test": [("10.0.0.8", 2525)]}
        await a.call("DELETE", "/api/domains/example.test/reroute")
        await b.server.ops.sync_reroutes()
        assert b.engine.reroutes == {"example.test": None}
        assert (await b.get_json("/api/domains/example.test"))["reroute"] is None


async def test_actions_need_delivery_for_reroute(tmp_path: Path) -> None:
    async with running_admin(tmp_path, with_engine=False) as h:
        async with h.http.put(h.url + "/api/domains/example.test/reroute", json={"hosts": ["10.0.0.7:25"]}) as r:
            assert r.status == 400
        qid = await put(h.spool, ["a@example.test"])
        assert (await h.call("POST", f"/api/queue/{qid}/hold"))["held"] == 1


async def test_refuses_a_non_loopback_listener_without_a_token_file(tmp_path: Path) -> None:
    from backupmx.config import config_from_dict
    from backupmx.maillog import NULL
    from backupmx.spool.sqlite import SqliteSpool

    cfg = config_from_dict({"server": {"data_dir": str(tmp_path / "d")}, "admin": {"listen": "0.0.0.0:0"}})
    spool = SqliteSpool(tmp_path / "d")
    server = AdminServer(cfg, spool, None, None, None, NULL, __import__("backupmx.clock").clock.SystemClock())
    with pytest.raises(ConfigError, match=r"admin\.listen: 0\.0\.0\.0:0 is not a loopback address"):
        await server.start()


async def test_without_a_token_file_a_token_is_generated_on_loopback(tmp_path: Path) -> None:
    from backupmx.config import config_from_dict

    data = tmp_path / "data"
    cfg = config_from_dict(
        {
            "server": {"data_dir": str(data), "listen": ["127.0.0.1:2525"]},
            "domains": [{"name": "example.test", "primary": ["127.0.0.1:1"]}],
            "admin": {"listen": "127.0.0.1:0"},
        }
    )
    async with running_admin(tmp_path, config=cfg) as h:
        token_file = data / "admin.token"
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token_file.stat().st_mode & 0o777 == 0o600
        async with h.anon.get(h.url + "/api/status") as r:
            assert r.status == 401
        async with h.anon.get(h.url + "/api/status", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200


async def test_a_short_token_is_a_config_error(tmp_path: Path) -> None:
    tf = tmp_path / "tok"
    tf.write_text("short\n")
    cfg = admin_config(tmp_path / "data", token_file=tf)
    with pytest.raises(ConfigError, match=r"admin\.token_file: the token .* at least 16"):
        async with running_admin(tmp_path, config=cfg):
            pass


async def test_security_headers_and_no_cache(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h, h.http.get(h.url + "/api/status") as r:
        assert r.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"


async def test_queue_ids_come_back_in_api_order(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        ids = [await put(h.spool, ["a@example.test"]) for _ in range(3)]
        page = await h.spool.list_messages(QueueFilter(), limit=10)
        doc = await h.get_json("/api/queue")
        assert [m["id"] for m in doc["messages"]] == [m.id for m in page] == ids
        assert QueueId(doc["messages"][0]["id"]) == ids[0]


def test_aiohttp_is_the_one_we_built_against() -> None:
    assert int(aiohttp.__version__.split(".")[0]) == 3


async def test_a_damaged_message_still_shows_its_envelope(tmp_path: Path) -> None:
    import sqlite3

    async with running_admin(tmp_path) as h:
        qid = await put(h.spool, ["a@example.test"])
        db = sqlite3.connect(h.config.server.data_dir / "spool.db")
        with db:  # same length, other bytes: the checksum no longer matches
            db.execute("UPDATE bodies SET data = zeroblob(length(data)) WHERE message_id = ?", (qid,))
        db.close()
        doc = await h.get_json(f"/api/queue/{qid}")
        assert doc["recipients"][0]["address"] == "a@example.test"
        assert "damaged" in doc["headers"][0][1]
