"""A primary whose banner refusal is 8-bit text (issue 12 item 1): the probe's reason is valid UTF-8."""

from __future__ import annotations

from backupmx.delivery.route import Target
from backupmx.monitor.probe import smtp_probe
from tests.support.scripted_primary import Answer, ScriptedPrimary


async def test_8bit_banner_refusal_is_a_readable_reason() -> None:
    p = await ScriptedPrimary(banner=Answer.of(b"421 4.3.2 Wartungsarbeiten f\xfcr heute\r\n", close=True)).start()
    try:
        res = await smtp_probe([Target("127.0.0.1", p.port, "127.0.0.1")], local_hostname="b.test", timeout=2)
    finally:
        await p.stop()
    assert not res.ok and res.error == "421 4.3.2 Wartungsarbeiten für heute"
    assert res.error.encode("utf-8")
