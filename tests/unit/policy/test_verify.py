"""recipients = "verify": the learned set (in the spool's kv table), RCPT probes, DOWN freezes the set,
unknown_while_down, "cannot tell" never rejects, learning from deliveries; accept = "when_primary_down"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backupmx.clock import FakeClock
from backupmx.config import DomainConfig
from backupmx.maillog import MailLog
from backupmx.monitor import DestinationState, DestinationStatus
from backupmx.policy import Action, SessionInfo, Stage
from backupmx.policy.learned import LearnedRecipient, LearnedRecipients, Source, learned_key
from backupmx.policy.verify import (
    PrimaryGate,
    ProbeAnswer,
    ProbeResult,
    RecipientVerifier,
    Verification,
    VerifyCheck,
    classify_rcpt,
)
from backupmx.spool.sqlite import SqliteSpool

SESSION = SessionInfo(client_ip="192.0.2.1")
DAY = 86400.0


class FakeHealth:
    def __init__(self, state: DestinationState = DestinationState.UP) -> None:
        self.state = state
        self.guard = False

    def status(self, domain: str) -> DestinationStatus:
        if domain != "ours.test":
            raise KeyError(domain)
        return DestinationStatus(domain, self.state, 0.0, None, None, None, None, 0)

    def in_recovery_guard(self, domain: str, now: float | None = None) -> bool:
        return self.guard


class FakeProber:
    """Users known to the fake primary; `fail` makes every probe a temporary failure."""

    def __init__(self, users: set[str]) -> None:
        self.users = users
        self.calls: list[str] = []
        self.fail: str | None = None
        self.delay = 0.0

    async def probe(self, domain: str, address: str) -> ProbeResult:
        self.calls.append(address)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            return ProbeResult(ProbeAnswer.TEMPFAIL, self.fail)
        if address.split("@")[0].lower() in self.users:
            return ProbeResult(ProbeAnswer.KNOWN, "250 2.1.5 Ok", answered=True)
        return ProbeResult(ProbeAnswer.UNKNOWN, "550 5.1.1 <x>: User unknown", answered=True)


class World:
    def __init__(self, spool: SqliteSpool, *, unknown_while_down: str = "accept") -> None:
        self.spool = spool
        assert isinstance(spool.clock, FakeClock)
        self.clock = spool.clock  # one clock: the kv table's expiry is read with the spool's
        self.health = FakeHealth()
        self.prober = FakeProber({"alice", "bob"})
        self.domain = DomainConfig(
            name="ours.test",
            recipients="verify",
            unknown_while_down=unknown_while_down,
            verify_positive_ttl="30d",
            verify_negative_ttl="1d",
        )  # type: ignore[arg-type]
        self.store = LearnedRecipients(spool)
        self.events: list[tuple[str, dict[str, object]]] = []
        maillog = MailLog(open("/dev/null", "w"))  # noqa: SIM115
        maillog.subscribe(lambda e, f: self.events.append((e, f)))
        self.verifier = RecipientVerifier(
            [self.domain], self.store, self.prober, self.health, self.clock, maillog=maillog, probe_wait=5.0
        )
        self.check = VerifyCheck([self.domain], self.verifier)

    async def rcpt(self, address: str) -> str:
        v = await self.check.check(Stage.RCPT, SESSION, address)
        if v.action is Action.CONTINUE:
            return "ok"
        assert v.reply is not None
        return str(v.reply)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    s = SqliteSpool(tmp_path / "data", clock=FakeClock())
    await s.open()
    yield s
    await s.close()


UNKNOWN_550 = "550 5.1.1 <{}>: Recipient address rejected: User unknown"
UNVERIFIED_450 = "450 4.1.1 <{}>: Recipient address rejected: unverified address"


@pytest.mark.parametrize(
    ("code", "message", "answer"),
    [
        (250, "2.1.5 Ok", ProbeAnswer.KNOWN),
        (251, "User not local; will forward", ProbeAnswer.KNOWN),
        (550, "5.1.1 <x@y>: Recipient address rejected: User unknown in virtual mailbox table", ProbeAnswer.UNKNOWN),
        (550, "No such user here", ProbeAnswer.UNKNOWN),
        (553, "mailbox name not allowed", ProbeAnswer.UNKNOWN),
        (551, "5.1.6 user has moved", ProbeAnswer.UNKNOWN),
        (550, "5.7.1 Client host rejected: go away", ProbeAnswer.TEMPFAIL),  # policy, not the user
        (554, "5.7.1 <x@y>: Relay access denied", ProbeAnswer.TEMPFAIL),
        (552, "5.2.2 Mailbox full", ProbeAnswer.TEMPFAIL),
        (450, "4.1.1 <x@y>: Recipient address rejected: unverified address", ProbeAnswer.TEMPFAIL),
        (421, "4.3.2 shutting down", ProbeAnswer.TEMPFAIL),
    ],
)
def test_classify_rcpt(code: int, message: str, answer: ProbeAnswer) -> None:
    assert classify_rcpt(code, message) is answer


def test_learned_key() -> None:
    assert learned_key("Alice@Ours.TEST") == "ours.test/alice"
    assert learned_key('"a@b"@ours.test') == 'ours.test/"a@b"'


async def test_up_probe_known_and_unknown_are_remembered(spool: SqliteSpool) -> None:
    w = World(spool)
    assert await w.rcpt("alice@ours.test") == "ok"
    assert await w.rcpt("nobody@ours.test") == UNKNOWN_550.format("nobody@ours.test")
    assert w.prober.calls == ["alice@ours.test", "nobody@ours.test"]
    # answered from the learned set now, case-insensitively, without asking again
    assert await w.rcpt("ALICE@ours.test") == "ok"
    assert await w.rcpt("nobody@ours.test") == UNKNOWN_550.format("nobody@ours.test")
    assert len(w.prober.calls) == 2
    alice = await w.store.get("alice@ours.test")
    assert alice == LearnedRecipient("alice@ours.test", True, Source.PROBE, w.clock.now(), w.clock.now() + 30 * DAY)
    nobody = await w.store.get("nobody@ours.test")
    assert nobody is not None and not nobody.known and nobody.expires_at == w.clock.now() + DAY
    assert [f["result"] for e, f in w.events if e == "verify"] == ["known", "unknown"]


async def test_ttls_expire_while_up(spool: SqliteSpool) -> None:
    w = World(spool)
    await w.rcpt("alice@ours.test")
    await w.rcpt("nobody@ours.test")
    w.clock.advance(DAY + 1)  # the negative answer is stale, the positive is not
    await w.rcpt("alice@ours.test")
    await w.rcpt("nobody@ours.test")
    assert w.prober.calls == ["alice@ours.test", "nobody@ours.test", "nobody@ours.test"]
    w.prober.users.add("nobody")  # the user was created on the primary meanwhile
    w.clock.advance(DAY + 1)
    assert await w.rcpt("nobody@ours.test") == "ok"
    w.clock.advance(30 * DAY)
    await w.rcpt("alice@ours.test")
    assert w.prober.calls.count("alice@ours.test") == 2


@pytest.mark.parametrize(("mode", "never_seen"), [("accept", "ok"), ("defer", UNVERIFIED_450), ("reject", UNKNOWN_550)])
async def test_down_freezes_learned_set_and_never_seen_follows_policy(
    spool: SqliteSpool, mode: str, never_seen: str
) -> None:
    w = World(spool, unknown_while_down=mode)
    await w.rcpt("alice@ours.test")
    await w.rcpt("nobody@ours.test")
    w.health.state = DestinationState.DOWN
    w.clock.advance(60 * DAY)  # far past both TTLs: frozen, not expired
    assert await w.rcpt("alice@ours.test") == "ok"
    assert await w.rcpt("nobody@ours.test") == UNKNOWN_550.format("nobody@ours.test")
    assert await w.rcpt("carol@ours.test") == never_seen.format("carol@ours.test")
    assert len(w.prober.calls) == 2  # nothing is probed while DOWN
    assert await w.rcpt("postmaster@ours.test") == "ok"
    assert await w.rcpt("alice@elsewhere.test") == "ok"  # not a verify domain: not ours to judge


@pytest.mark.parametrize(
    ("mode", "expected"), [("accept", "ok"), ("defer", UNVERIFIED_450), ("reject", UNVERIFIED_450)]
)
async def test_probe_failure_never_rejects(spool: SqliteSpool, mode: str, expected: str) -> None:
    w = World(spool, unknown_while_down=mode)
    w.prober.fail = "probe timed out"
    assert await w.rcpt("alice@ours.test") == expected.format("alice@ours.test")
    assert await w.store.get("alice@ours.test") is None  # nothing learned from a failure


async def test_probe_failure_uses_stale_positive_not_stale_negative(spool: SqliteSpool) -> None:
    w = World(spool, unknown_while_down="defer")
    await w.rcpt("alice@ours.test")
    await w.rcpt("nobody@ours.test")
    w.clock.advance(31 * DAY)
    w.prober.fail = "451 4.3.0 try later"
    assert await w.rcpt("alice@ours.test") == "ok"
    assert await w.rcpt("nobody@ours.test") == UNVERIFIED_450.format("nobody@ours.test")


async def test_5xx_while_recovering_is_not_trusted(spool: SqliteSpool) -> None:
    w = World(spool, unknown_while_down="defer")
    w.health.state = DestinationState.RECOVERING
    assert await w.rcpt("carol@ours.test") == UNVERIFIED_450.format("carol@ours.test")
    assert await w.store.get("carol@ours.test") is None
    w.health.state = DestinationState.UP
    w.health.guard = True  # the recovery guard after an outage
    assert await w.rcpt("carol@ours.test") == UNVERIFIED_450.format("carol@ours.test")
    w.health.guard = False
    assert await w.rcpt("carol@ours.test") == UNKNOWN_550.format("carol@ours.test")
    assert await w.rcpt("bob@ours.test") == "ok"


async def test_unknown_state_probes(spool: SqliteSpool) -> None:
    w = World(spool)
    w.health.state = DestinationState.UNKNOWN  # not probed yet after a start: ask the primary anyway
    assert await w.rcpt("nobody@ours.test") == UNKNOWN_550.format("nobody@ours.test")


async def test_concurrent_rcpts_for_one_address_probe_once(spool: SqliteSpool) -> None:
    w = World(spool)
    w.prober.delay = 0.05
    answers = await asyncio.gather(*(w.rcpt("bob@ours.test") for _ in range(20)))
    assert answers == ["ok"] * 20
    assert w.prober.calls == ["bob@ours.test"]
    assert not w.verifier._busy  # no lock left behind


async def test_learned_set_survives_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    s1 = SqliteSpool(tmp_path / "data", clock=clock)
    await s1.open()
    w1 = World(s1)
    await w1.rcpt("alice@ours.test")
    await w1.rcpt("nobody@ours.test")
    await s1.close()
    s2 = SqliteSpool(tmp_path / "data", clock=clock)
    await s2.open()
    try:
        w2 = World(s2)
        assert await w2.rcpt("alice@ours.test") == "ok"
        assert await w2.rcpt("nobody@ours.test") == UNKNOWN_550.format("nobody@ours.test")
        assert w2.prober.calls == []
        listed = await w2.store.list("ours.test")
        assert [(e.address, e.known) for e in listed] == [("alice@ours.test", True), ("nobody@ours.test", False)]
    finally:
        await s2.close()


async def test_deliveries_teach_known_addresses(spool: SqliteSpool) -> None:
    w = World(spool)
    runner = asyncio.create_task(w.verifier.run())
    try:
        await asyncio.sleep(0)
        w.verifier.on_maillog("delivered", {"to": "<carol@ours.test>", "relay": "p:25"})
        w.verifier.on_maillog("deferred", {"to": "<dave@ours.test>"})
        w.verifier.on_maillog("delivered", {"to": "<x@elsewhere.test>"})
        for _ in range(100):
            if await w.store.get("carol@ours.test") is not None:
                break
            await asyncio.sleep(0.01)
        carol = await w.store.get("carol@ours.test")
        assert carol is not None and carol.known and carol.source == Source.DELIVERED
        assert await w.store.get("dave@ours.test") is None
        assert await w.rcpt("carol@ours.test") == "ok"
        assert w.prober.calls == []
        # an operator's entry is never replaced by a shorter-lived one
        await w.store.put(LearnedRecipient("erin@ours.test", True, Source.OPERATOR, w.clock.now(), None))
        w.verifier.note_delivered("erin@ours.test")
        assert await w.verifier.flush() == 0
        erin = await w.store.get("erin@ours.test")
        assert erin is not None and erin.source == Source.OPERATOR
    finally:
        w.verifier.stop()
        await asyncio.wait_for(runner, 5)


async def test_storage_errors_are_cannot_tell(spool: SqliteSpool) -> None:
    w = World(spool, unknown_while_down="defer")
    await spool.close()  # every kv call fails now
    assert await w.rcpt("alice@ours.test") == "ok"  # probed; the answer could not be stored, still used
    w.health.state = DestinationState.DOWN
    assert await w.rcpt("alice@ours.test") == UNVERIFIED_450.format("alice@ours.test")
    await spool.open()


async def test_verification_values() -> None:
    assert {v.value for v in Verification} == {"known", "unknown", "never-seen", "cannot-tell"}


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (DestinationState.UP, "450 4.3.2 Temporarily not accepting mail for this domain, try again later"),
        (DestinationState.DOWN, "ok"),
        (DestinationState.UNKNOWN, "ok"),
        (DestinationState.RECOVERING, "ok"),
    ],
)
async def test_accept_when_primary_down(state: DestinationState, expected: str) -> None:
    health = FakeHealth(state)
    gate = PrimaryGate(
        [DomainConfig(name="ours.test", accept="when_primary_down"), DomainConfig(name="other.test")], health
    )
    assert gate.active
    v = await gate.check(Stage.RCPT, SESSION, "alice@ours.test")
    assert (str(v.reply) if v.reply else "ok") == expected
    assert (await gate.check(Stage.RCPT, SESSION, "alice@other.test")).action is Action.CONTINUE
    assert not PrimaryGate([DomainConfig(name="other.test")], health).active
