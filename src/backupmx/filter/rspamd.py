"""The rspamd client: `POST /checkv2` with the envelope and client facts, its action turned into a reply.

reject → 550 5.7.1 (nothing stored); soft reject and greylist → 451 4.7.1; add header and rewrite
subject → the stored copy edited per the reply's `milter` block (plus `X-Spam: Yes` for add header
when rspamd did not add it, as rspamd's own milter does) and the new Subject; no action → as it came,
with the `milter` block's fields. rspamd unreachable, slower than `[filter] timeout`, an HTTP error or
a reply that is not rspamd's JSON: `[filter] on_error` ("accept": stored unchanged; "tempfail": 451
4.3.0). Client-facing texts are fixed; rspamd's score and message go only to the mail log.
Mail whose recipients are all in domains with `filter = false` is not scanned.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from backupmx.config import Config, FilterConfig
from backupmx.filter import Refusal, Screening
from backupmx.filter.edit import HeaderEdits, apply_edits, valid_name
from backupmx.policy import SessionInfo
from backupmx.reply import Reply
from backupmx.spool.body import BodyBuffer

log = logging.getLogger("backupmx.filter")

SPAM_REJECTED = Reply(550, "5.7.1", "Message rejected as spam")
SPAM_DEFERRED = Reply(451, "4.7.1", "Try again later")
FILTER_UNAVAILABLE = Reply(451, "4.3.0", "Error: temporary failure, try again later")

_REFUSE = {"reject": SPAM_REJECTED, "soft reject": SPAM_DEFERRED, "greylist": SPAM_DEFERRED}
_KNOWN = {"reject", "soft reject", "greylist", "add header", "rewrite subject", "no action"}


class FilterUnavailable(Exception):
    """rspamd did not give a usable answer (the text says why, for the log)."""


def _adds(raw: Any) -> list[tuple[str, str, int]]:
    """`add_headers`: name → {"value", "order"} | [those] | "value" (rspamd's lua_mime.modify_headers)."""
    out: list[tuple[str, str, int]] = []
    if not isinstance(raw, dict):
        return out
    for name, spec in raw.items():
        if not isinstance(name, str) or not valid_name(name):
            log.warning("rspamd asked to add a header field with an invalid name %r: skipped", name)
            continue
        for item in spec if isinstance(spec, list) else [spec]:
            if isinstance(item, str):
                out.append((name, item, -1))
            elif isinstance(item, dict) and isinstance(item.get("value"), str):
                order = item.get("order", -1)
                out.append((name, item["value"], order if isinstance(order, int) else -1))
    return out


def _removes(raw: Any) -> list[tuple[str, int]]:
    """`remove_headers`: name → index | [indexes] (0 = every field of that name)."""
    out: list[tuple[str, int]] = []
    if not isinstance(raw, dict):
        return out
    for name, spec in raw.items():
        if not isinstance(name, str):
            continue
        for index in spec if isinstance(spec, list) else [spec]:
            if isinstance(index, int) and not isinstance(index, bool):
                out.append((name, index))
    return out


def edits_of(reply: dict[str, Any]) -> HeaderEdits:
    """The header edits of one /checkv2 reply."""
    action = reply.get("action")
    milter = reply.get("milter") if isinstance(reply.get("milter"), dict) else {}
    assert isinstance(milter, dict)
    adds = _adds(milter.get("add_headers"))
    if action == "add header" and not any(n.lower() == "x-spam" for n, _v, _o in adds):
        adds.append(("X-Spam", "Yes", -1))
    subject = reply.get("subject") if action == "rewrite subject" else None
    return HeaderEdits(
        add=tuple(adds),
        remove=tuple(_removes(milter.get("remove_headers"))),
        subject=subject if isinstance(subject, str) else None,
    )


def describe(reply: dict[str, Any]) -> str:
    """ "rspamd reject score=15.00/15.00 message=Gtube pattern" for the mail log."""
    text = f"rspamd {reply.get('action')}"
    score, required = reply.get("score"), reply.get("required_score")
    if isinstance(score, int | float):
        text += f" score={score:.2f}" + (f"/{required:.2f}" if isinstance(required, int | float) else "")
    messages = reply.get("messages")
    if isinstance(messages, dict) and isinstance(messages.get("smtp_message"), str):
        text += f" message={messages['smtp_message'][:200]}"
    return text


class RspamdFilter:
    name = "rspamd"

    def __init__(self, cfg: FilterConfig, *, hostname: str, scanned_domains: frozenset[str]) -> None:
        assert cfg.rspamd is not None
        self._url = cfg.rspamd + "/checkv2"
        self._timeout = cfg.timeout.total_seconds()
        self._password = cfg.password
        self._on_error = cfg.on_error
        self._hostname = hostname
        self._domains = scanned_domains
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> RspamdFilter | None:
        if cfg.filter.rspamd is None:
            return None
        return cls(
            cfg.filter, hostname=cfg.server.hostname, scanned_domains=frozenset(d.name for d in cfg.domains if d.filter)
        )

    def wanted(self, recipients: list[str]) -> bool:
        return any(r.rpartition("@")[2].lower() in self._domains for r in recipients)

    async def screen(self, session: SessionInfo, queue_id: str, body: BodyBuffer, tmp_dir: Path | None) -> Screening:
        if not self.wanted(session.recipients):
            return Screening(body)
        try:
            return await self._screen(session, queue_id, body, tmp_dir)
        except Exception:  # a bug of ours, or a reply shape we did not foresee: never a lost or refused message
            log.exception("rspamd screening of %s failed: on_error = %s", queue_id, self._on_error)
            return self._failed(body, "internal error")

    def _failed(self, body: BodyBuffer, why: str) -> Screening:
        if self._on_error == "tempfail":
            return Screening(body, Refusal(FILTER_UNAVAILABLE, f"rspamd unavailable: {why}"))
        return Screening(body)

    async def _screen(self, session: SessionInfo, queue_id: str, body: BodyBuffer, tmp_dir: Path | None) -> Screening:
        try:
            reply = await asyncio.wait_for(self._ask(session, queue_id, body), self._timeout)
        except (TimeoutError, FilterUnavailable, aiohttp.ClientError, OSError) as e:
            why = "no answer within the timeout" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            log.warning("rspamd unavailable for %s (%s): on_error = %s", queue_id, why, self._on_error)
            return self._failed(body, why)
        action = reply["action"]
        refuse = _REFUSE.get(action)
        if refuse is not None:
            return Screening(body, Refusal(refuse, describe(reply)))
        edited = apply_edits(body, edits_of(reply), tmp_dir)
        if edited is not body:
            body.close()
        return Screening(edited)

    async def _ask(self, session: SessionInfo, queue_id: str, body: BodyBuffer) -> dict[str, Any]:
        headers: list[tuple[str, str]] = [
            ("Ip", session.client_ip),
            ("Helo", session.helo or session.client_ip),
            ("From", f"<{session.sender or ''}>"),
            ("Queue-Id", queue_id),
            ("MTA-Name", self._hostname),
            ("Content-Length", str(body.size)),
        ]
        headers += [("Rcpt", f"<{r}>") for r in session.recipients]
        if session.tls_version:
            headers += [("TLS-Version", session.tls_version), ("TLS-Cipher", session.tls_cipher)]
        if self._password:
            headers.append(("Password", self._password))
        if self._session is None or self._session.closed:
            # no cookies, no proxies from the environment: rspamd is asked directly
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)

        async def stream() -> AsyncIterator[bytes]:
            for block in body.chunks():
                yield block

        async with self._session.post(self._url, data=stream(), headers=headers) as resp:
            text = await resp.text(errors="replace")
            if resp.status != 200:
                raise FilterUnavailable(f"HTTP {resp.status}: {text[:200]}")
        try:
            reply = json.loads(text)
        except ValueError:
            raise FilterUnavailable(f"not JSON: {text[:200]!r}") from None
        if not isinstance(reply, dict) or reply.get("action") not in _KNOWN:
            raise FilterUnavailable(f"no known action in {text[:200]!r}")
        return reply

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


__all__ = ["FILTER_UNAVAILABLE", "SPAM_DEFERRED", "SPAM_REJECTED", "RspamdFilter", "edits_of"]
