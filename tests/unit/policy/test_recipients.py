"""Recipient lists (RELIABILITY.md #36): static, file-backed with reload, any/verify, postmaster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backupmx.config import DomainConfig
from backupmx.errors import ConfigError
from backupmx.policy import Action, SessionInfo, Stage
from backupmx.policy.recipients import (
    AnyRecipient,
    FileRecipients,
    RecipientCheck,
    RecipientDirectory,
)

SESSION = SessionInfo(client_ip="192.0.2.1")


async def verdict(chk: RecipientCheck, address: str) -> tuple[Action, str]:
    v = await chk.check(Stage.RCPT, SESSION, address)
    return v.action, str(v.reply) if v.reply else ""


async def test_static_list() -> None:
    chk = RecipientCheck([DomainConfig(name="ours.test", recipients=("alice@ours.test", "Bob", "@sub.test"))])
    assert (await verdict(chk, "alice@ours.test"))[0] is Action.CONTINUE
    assert (await verdict(chk, "ALICE@ours.test"))[0] is Action.CONTINUE
    assert (await verdict(chk, "bob@ours.test"))[0] is Action.CONTINUE  # a bare local part means this domain
    assert await verdict(chk, "carol@ours.test") == (
        Action.REJECT,
        "550 5.1.1 <carol@ours.test>: Recipient address rejected: User unknown",
    )
    assert (await verdict(chk, "postmaster@ours.test"))[0] is Action.ACCEPT
    assert (await verdict(chk, "PostMaster@ours.test"))[0] is Action.ACCEPT
    assert (await verdict(chk, "x@elsewhere.test"))[0] is Action.CONTINUE  # relay control's business


async def test_any_and_verify_accept_everyone() -> None:
    chk = RecipientCheck(
        [DomainConfig(name="a.test", recipients="any"), DomainConfig(name="v.test", recipients="verify")]
    )
    assert (await verdict(chk, "whoever@a.test"))[0] is Action.CONTINUE
    assert (await verdict(chk, "whoever@v.test"))[0] is Action.CONTINUE
    assert isinstance(chk.directory("V.TEST"), AnyRecipient)


class Unsure:
    async def lookup(self, address: str) -> bool | None:
        return None


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("accept", (Action.CONTINUE, "")),
        ("defer", (Action.DEFER, "450 4.1.1 <u@ours.test>: Recipient address rejected: unverified address")),
        ("reject", (Action.REJECT, "550 5.1.1 <u@ours.test>: Recipient address rejected: User unknown")),
    ],
)
async def test_directory_that_cannot_tell(mode: str, expected: tuple[Action, str]) -> None:
    d = DomainConfig(name="ours.test", recipients="verify", unknown_while_down=mode)  # type: ignore[arg-type]
    unsure: RecipientDirectory = Unsure()
    chk = RecipientCheck([d], directories={"ours.test": unsure})
    assert await verdict(chk, "u@ours.test") == expected
    chk2 = RecipientCheck([d])
    chk2.set_directory("ours.test", unsure)
    assert await verdict(chk2, "u@ours.test") == expected


async def test_file_list_with_comments_wildcards_and_reload(tmp_path: Path) -> None:
    f = tmp_path / "rcpts.txt"
    f.write_text(
        "# users\nalice@ours.test\n  bob@ours.test  # a note after the address\n@team.test\n<carol@ours.test>\n\n"
    )
    now = [100.0]
    d = FileRecipients(f, "ours.test", monotonic=lambda: now[0])
    assert await d.lookup("alice@ours.test") is True
    assert await d.lookup("bob@ours.test") is True
    assert await d.lookup("anyone@team.test") is True
    assert await d.lookup("carol@ours.test") is True
    assert await d.lookup("dave@ours.test") is False
    f.write_text("dave@ours.test\n")
    os.utime(f, ns=(f.stat().st_mtime_ns + 2_000_000_000,) * 2)
    assert await d.lookup("dave@ours.test") is False  # looked at most once a second
    now[0] += 1.5
    assert await d.lookup("dave@ours.test") is True
    assert await d.lookup("alice@ours.test") is False
    f.unlink()  # unreadable later: the last good list is kept
    now[0] += 5
    assert d.reload() is False
    assert await d.lookup("dave@ours.test") is True


async def test_file_reload_via_check(tmp_path: Path) -> None:
    f = tmp_path / "r.txt"
    f.write_text("alice@ours.test\n")
    chk = RecipientCheck([DomainConfig(name="ours.test", recipients=f"file:{f}")])
    assert (await verdict(chk, "bob@ours.test"))[0] is Action.REJECT
    f.write_text("bob@ours.test\n")
    chk.reload()  # SIGHUP
    assert (await verdict(chk, "bob@ours.test"))[0] is Action.CONTINUE


def test_missing_file_at_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        RecipientCheck([DomainConfig(name="ours.test", recipients=f"file:{tmp_path / 'nope'}")])
