"""HealthMonitor: the state machine (UNKNOWN/UP -> DOWN -> RECOVERING -> UP), outages declared in the
spool and surviving a restart, delivery results, drills, and the SMTP probe against real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backupmx.monitor import DestinationState as S
from backupmx.monitor.probe import HealthMonitor, smtp_probe
from tests.unit.delivery.fake_primary import BlackHole, Primary, closed_port
from tests.unit.delivery.harness import T0, Harness, make_config


@pytest.fixture
async def primary() -> AsyncIterator[Primary]:
    p = await Primary().start()
    yield p
    await p.stop()


async def make(tmp_path: Path, target: str, **delivery: object) -> Harness:
    h = Harness(tmp_path, make_config(target, delivery=delivery or None))  # type: ignore[arg-type]
    return await h.open()


async def test_up_down_recovering_up(tmp_path: Path, primary: Primary) -> None:
    port = primary.port
    h = await make(tmp_path, primary.hostport, down_after=2)
    seen: list[tuple[str, S, S]] = []
    h.monitor.subscribe(lambda d, old, new: seen.append((d, old, new)))
    assert h.monitor.status("example.com").state is S.UNKNOWN
    assert (await h.monitor.probe_now("example.com")).state is S.UP
    await primary.stop()
    h.fake.advance(10)
    st = await h.monitor.probe_now("example.com")
    assert st.state is S.UP and st.consecutive_failures == 1 and "refused" in (st.last_error or "")
    assert h.monitor.is_deliverable("example.com")
    h.fake.advance(10)
    st = await h.monitor.probe_now("example.com")
    assert st.state is S.DOWN and st.outage_declared
    assert st.outage_since == T0 + 10  # from the first failure
    assert not h.monitor.is_deliverable("example.com")
    outages = await h.spool.outages("example.com")
    assert [(o.started_at, o.ended_at) for o in outages] == [(T0 + 10, None)]
    assert h.events.named("outage-declared")[0]["domain"] == "example.com"

    await primary.start(port)
    h.fake.advance(10)
    st = await h.monitor.probe_now("example.com")
    assert st.state is S.RECOVERING and st.recovered_at == T0 + 30 and not st.outage_declared
    assert (await h.spool.outages("example.com"))[0].ended_at == T0 + 30
    assert h.events.named("primary-back")[0]["domain"] == "example.com"
    assert h.monitor.is_deliverable("example.com")
    assert h.monitor.in_recovery_guard("example.com")
    h.fake.advance(10)
    assert (await h.monitor.probe_now("example.com")).state is S.UP
    assert seen == [
        ("example.com", S.UNKNOWN, S.UP),
        ("example.com", S.UP, S.DOWN),
        ("example.com", S.DOWN, S.RECOVERING),
        ("example.com", S.RECOVERING, S.UP),
    ]
    snap = h.monitor.snapshot()
    assert set(snap) == {"example.com"} and snap["example.com"].state is S.UP
    await h.close()


async def test_declared_outage_survives_restart(tmp_path: Path) -> None:
    port = closed_port()
    h = await make(tmp_path, f"127.0.0.1:{port}", down_after=1)
    await h.monitor.probe_now("example.com")
    assert h.monitor.status("example.com").state is S.DOWN
    await h.close()
    # a new process: the open outage in the spool makes it start DOWN
    h2 = await make(tmp_path, f"127.0.0.1:{port}", down_after=1)
    st = h2.monitor.status("example.com")
    assert st.state is S.DOWN and st.outage_since == T0
    assert not h2.monitor.is_deliverable("example.com")
    p = await Primary().start(port)
    try:
        st = await h2.monitor.probe_now("example.com")
        assert st.state is S.RECOVERING
        await h2.close()
        h3 = await make(tmp_path, f"127.0.0.1:{port}")
        assert h3.monitor.status("example.com").state is S.UNKNOWN
        assert h3.monitor.status("example.com").recovered_at == T0  # the guard survives too
        await h3.close()
    finally:
        await p.stop()


async def test_delivery_results_feed_the_monitor(tmp_path: Path, primary: Primary) -> None:
    h = await make(tmp_path, primary.hostport, down_after=3)
    for _ in range(3):  # a burst is one observation (issue 12 item 7) ...
        await h.monitor.report_delivery("example.com", ok=False, error="connection refused")
    assert h.monitor.status("example.com").consecutive_failures == 1
    for _ in range(2):  # ... failures a probe interval (1 s) apart count each
        h.fake.advance(1.0)
        await h.monitor.report_delivery("example.com", ok=False, error="connection refused")
    assert h.monitor.status("example.com").state is S.DOWN
    await h.monitor.report_delivery("example.com", ok=True)
    assert h.monitor.status("example.com").state is S.RECOVERING
    await h.monitor.report_delivery("other.test", ok=False)  # not watched: ignored
    assert h.monitor.is_deliverable("other.test")
    await h.close()


async def test_force_down_holds_until_cleared(tmp_path: Path, primary: Primary) -> None:
    h = await make(tmp_path, primary.hostport)
    await h.monitor.force_down("example.com", "fire drill")
    st = await h.monitor.probe_now("example.com")  # the primary answers, the drill wins
    assert st.state is S.DOWN and "fire drill" in (st.last_error or "")
    assert (await h.spool.outages("example.com"))[0].ended_at is None
    await h.monitor.clear_force("example.com")
    assert h.monitor.status("example.com").state is S.RECOVERING
    await h.close()


async def test_probe_rcpt(tmp_path: Path, primary: Primary) -> None:
    primary.rcpt_rule = lambda a: "550 5.1.1 unknown" if a == "probe@example.com" else None
    h = Harness(
        tmp_path, make_config(primary.hostport, delivery={"down_after": 1}, domain={"probe_rcpt": "probe@example.com"})
    )
    await h.open()
    st = await h.monitor.probe_now("example.com")
    assert st.state is S.DOWN and "550" in (st.last_error or "")
    primary.rcpt_rule = None
    assert (await h.monitor.probe_now("example.com")).state is S.RECOVERING
    assert primary.received == []  # RSET, never DATA
    await h.close()


async def test_black_hole_probe_times_out() -> None:
    hole = BlackHole()
    try:
        from backupmx.delivery.route import Target

        result = await asyncio.wait_for(
            smtp_probe([Target("127.0.0.1", hole.port, "127.0.0.1")], local_hostname="b.test", timeout=0.5), 5
        )
        assert not result.ok and "timed out" in (result.error or "")
    finally:
        hole.close()


async def test_no_route_is_a_failure(tmp_path: Path) -> None:
    # the configured primary is ourselves: the route fails, so does the probe
    cfg = make_config("127.0.0.1:2999", delivery={"down_after": 1})
    h = Harness(tmp_path, cfg)
    await h.open()
    st = await h.monitor.probe_now("example.com")
    assert st.state is S.DOWN and "no route" in (st.last_error or "")
    await h.close()


async def test_run_probes_every_interval(tmp_path: Path, primary: Primary) -> None:
    from backupmx.clock import SystemClock

    h = Harness(tmp_path, make_config(primary.hostport, delivery={"probe_interval": "1s"}), clock=SystemClock())
    await h.open()
    task = asyncio.create_task(h.monitor.run())
    try:
        for _ in range(50):
            if primary.sessions >= 2:
                break
            await asyncio.sleep(0.1)
        assert primary.sessions >= 2  # t=0 and t=1s
        assert h.monitor.status("example.com").state is S.UP
    finally:
        h.monitor.stop()
        await asyncio.wait_for(task, 5)
    await h.close()


def test_constructor_shape() -> None:
    assert list(HealthMonitor.__init__.__code__.co_varnames[1:6]) == ["config", "spool", "clock", "maillog", "resolver"]
