"""/metrics scraped over HTTP and parsed with prometheus_client's own parser: the values are the spool's,
the health view's, the engine's and the mail log's; labels are enums and configured domains only."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from backupmx.admin.metrics import METRICS
from backupmx.monitor import DestinationState
from tests.unit.admin.harness import TOKEN, admin_config, put, running_admin


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_match_the_spool_and_the_monitor(tmp_path: Path) -> None:
    async with running_admin(tmp_path) as h:
        now = time.time()
        h.health.set("example.test", DestinationState.DOWN, outage_since=now - 120)
        h.health.set("other.test", DestinationState.UP)
        h.engine.concurrency = {"other.test": 3}
        h.smtp.sessions_open = 4
        q1 = await put(h.spool, ["a@example.test", "b@example.test"], now=now - 300)
        await put(h.spool, ["c@example.test", "d@other.test"], now=now - 60)
        await h.spool.hold(q1)
        await h.spool.hold(await put(h.spool, ["p@other.test"], now=now - 30), reason="poison")
        h.maillog.event("queued", "Q1", to="<a@example.test>,<b@example.test>", nrcpt=2)
        h.maillog.event("reject", None, recipient="<x@elsewhere.test>", reply="554 5.7.1 Relay access denied")
        h.maillog.event("reject", None, recipient="<nobody@example.test>", reply="550 5.1.1 unknown user")
        h.maillog.event("deferred", "Q1", to="<d@other.test>", dsn="4.4.1", reply="451 4.4.1 connect refused")
        h.maillog.event("delivered", "Q1", to="<d@other.test>", dsn="2.0.0", reply="250 2.0.0 Ok")
        h.maillog.event("bounced", "Q1", to="<e@other.test>", dsn="5.1.1", reply="550 5.1.1 unknown")
        # our own mail: apart from the user mail above
        h.maillog.event("queued", "Q2", to="<canary@example.test>", nrcpt=1, kind="canary")
        h.maillog.event("delivered", "Q2", to="<canary@example.test>", dsn="2.0.0", reply="250 2.0.0 Ok", kind="canary")
        h.maillog.event("bounced", "Q3", to="<bob@sender.test>", dsn="5.7.1", reply="554 5.7.1 no", kind="dsn")

        async with h.anon.get(h.url + "/metrics") as r:  # loopback: no token needed
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await r.text()
        s = samples(text)
        stats = await h.spool.stats()

    def v(name: str, **labels: str) -> float:
        return s[(name, tuple(sorted(labels.items())))]

    assert v("backupmx_queue_recipients", domain="example.test", state="held") == 2
    assert v("backupmx_queue_recipients", domain="example.test", state="queued") == 1
    assert v("backupmx_queue_recipients", domain="other.test", state="queued") == 1
    assert v("backupmx_queue_messages", domain="example.test") == 2
    assert v("backupmx_held_recipients", domain="example.test", reason="operator") == 2
    assert v("backupmx_held_recipients", domain="other.test", reason="poison") == 1
    assert 290 <= v("backupmx_oldest_message_age_seconds", domain="example.test") <= 400
    assert v("backupmx_primary_up", domain="example.test") == 0
    assert v("backupmx_primary_up", domain="other.test") == 1
    assert v("backupmx_primary_state", domain="example.test", state="down") == 1
    assert v("backupmx_primary_state", domain="example.test", state="up") == 0
    assert v("backupmx_outage_declared", domain="example.test") == 1
    assert v("backupmx_outage_declared", domain="other.test") == 0
    assert 110 <= v("backupmx_outage_duration_seconds", domain="example.test") <= 200
    assert v("backupmx_delivery_concurrency", domain="other.test") == 3
    assert v("backupmx_smtp_open_sessions") == 4
    assert v("backupmx_spool_size_bytes") == stats.bytes_on_disk > 0
    assert v("backupmx_disk_free_bytes") > 0
    assert v("backupmx_mail_events_total", event="accepted", domain="example.test", reason="ok") == 2
    assert v("backupmx_mail_events_total", event="rejected", domain="other", reason="policy") == 1
    assert v("backupmx_mail_events_total", event="rejected", domain="example.test", reason="address") == 1
    assert v("backupmx_mail_events_total", event="deferred", domain="other.test", reason="network") == 1
    assert v("backupmx_mail_events_total", event="delivered", domain="other.test", reason="ok") == 1
    assert v("backupmx_mail_events_total", event="bounced", domain="other.test", reason="address") == 1
    assert (
        "backupmx_mail_events_total",
        (("domain", "example.test"), ("event", "delivered"), ("reason", "ok")),
    ) not in s  # the canary is no user mail
    assert v("backupmx_own_mail_events_total", kind="canary", event="accepted", reason="ok") == 1
    assert v("backupmx_own_mail_events_total", kind="canary", event="delivered", reason="ok") == 1
    assert v("backupmx_own_mail_events_total", kind="dsn", event="bounced", reason="policy") == 1
    # every name is documented, every label value is a configured domain or an enum value
    names = {name for name, _ in s}
    assert {n.removesuffix("_total") for n in names} <= {n.removesuffix("_total") for n in METRICS}
    for _, labels in s:
        for key, value in labels:
            assert "@" not in value and "192.0.2" not in value, (key, value)
            if key == "domain":
                assert value in ("example.test", "other.test", "other")


async def test_metrics_need_the_token_off_loopback(tmp_path: Path) -> None:
    cfg = admin_config(tmp_path / "data", listen="0.0.0.0:0")
    async with running_admin(tmp_path, config=cfg) as h:
        url = f"http://127.0.0.1:{h.server.bound[1]}/metrics"
        async with h.anon.get(url) as r:
            assert r.status == 401
        async with h.anon.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200
            assert "backupmx_build_info" in await r.text()
