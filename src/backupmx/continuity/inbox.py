"""The emergency inbox: a read-only web mail view of the mail held for one recipient, on its own
listener (`[continuity] listen`), never the admin one.

- Closed unless the domain's inbox is open (gate.py): while no domain is open, every request but the
  stylesheet gets a 403 page saying so; a recipient of a domain that is not open gets it too.
- A person signs in with a one-time link (GET shows a button, so link previewers do not spend it; POST
  exchanges it for an HttpOnly, SameSite=Strict session cookie, Secure over HTTPS). No password exists.
- Every query is scoped by the session's address: the list holds only messages with a *pending*
  recipient equal to it; a message URL carries an HMAC of (queue ID, address) and the message is checked
  to be the address's on every request anyway. Someone else's message is a 404, the same as none.
- HTML mail is sanitised (render.py) and shown in an iframe sandboxed without allow-scripts, from its
  own URL under a CSP with no script and no network; attachments download as attachments, never render.
- Nothing here changes the queue: no delete, no flag; held mail still goes to the primary when it is back.
Errors: a spool error is a 503 page; every refusal is a page in the reader's language (Accept-Language).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import zoneinfo
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web

from backupmx import __version__
from backupmx.clock import Clock
from backupmx.config import Config
from backupmx.continuity.audit import AUDIT_FILE, AuditLog
from backupmx.continuity.gate import Gate, GateState, HealthSnapshot, MonitorOutages, OutageSource
from backupmx.continuity.grants import AccessStore, Session
from backupmx.continuity.i18n import Translator, choose
from backupmx.continuity.render import (
    FRAME_CSP,
    ParsedMessage,
    SafeHtml,
    Summary,
    TooLarge,
    attachment_bytes,
    frame_document,
    read_head,
    safe_html,
    summarize,
)
from backupmx.continuity.tokens import SECRET_FILE, LinkRefused, Refusal, Signer, load_secret
from backupmx.continuity.viewcache import ViewCache
from backupmx.errors import NotFound, SpoolError
from backupmx.model import MessageKind, MessageRecord, QueueId
from backupmx.signinlimit import FailureLimiter, client_network
from backupmx.spool import QueueFilter, Spool
from backupmx.weblisten import same_origin, set_security_headers, site_url, start_site

log = logging.getLogger("backupmx.continuity")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Sanitizer = Callable[[str, dict[str, str]], SafeHtml]

COOKIE = "backupmx_inbox"
LANG_COOKIE = "backupmx_lang"
PAGE_SIZE = 50
AUDIT_FLUSH_SECONDS = 15.0  # how often ended bursts of refusals are written out
MAX_LISTED = 20_000  # messages of one person scanned for the list, newest kept
STATIC_DIR = Path(__file__).parent / "static"
PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; frame-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" makes Chromium send Origin: null on our own forms
    "Content-Security-Policy": PAGE_CSP,
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


class _Page(Exception):
    """Stop here and answer with this page (raised from helpers, turned into a response once)."""

    def __init__(self, status: int, template: str, *, headers: dict[str, str] | None = None, **ctx: Any) -> None:
        super().__init__(template)
        self.status = status
        self.template = template
        self.headers = headers or {}
        self.ctx = ctx


@dataclass(frozen=True, slots=True)
class Row:
    id: str
    url: str
    summary: Summary
    size: int
    received_at: float

    @property
    def arrived(self) -> datetime:
        return datetime.fromtimestamp(self.received_at, UTC)


def is_owned(message: MessageRecord, address: str) -> bool:
    """`address` is a recipient of `message` that has not had it yet (held = not yet delivered)."""
    if message.kind is MessageKind.CANARY:
        return False
    return any(r.address.lower() == address and not r.state.is_final for r in message.recipients)


class InboxApp:
    """The handlers. Built by ContinuityServer; tests build it directly around a spool and a gate."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        gate: Gate,
        access: AccessStore,
        signer: Signer,
        audit: AuditLog,
        clock: Clock,
        *,
        sanitize: Sanitizer = safe_html,
        limiter: FailureLimiter | None = None,
    ) -> None:
        self.config = config
        self.limiter = limiter or FailureLimiter(clock)
        self.views = ViewCache()  # parses once per view, on threads of its own
        self.spool = spool
        self.gate = gate
        self.access = access
        self.signer = signer
        self.audit = audit
        self.clock = clock
        self.sanitize = sanitize
        self.tz = zoneinfo.ZoneInfo(config.continuity.timezone)
        self.https = config.continuity.tls_cert is not None
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("backupmx.continuity", "templates"),
            autoescape=True,
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.globals.update(version=__version__)

    # -- wiring ----------------------------------------------------------------------------------
    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._headers_mw, self._errors_mw, self._gate_mw], client_max_size=64 * 1024)
        app.router.add_static("/static", STATIC_DIR, append_version=False)
        mid = "/m/{id:[0-9A-Z]{14}}/{tok:[A-Za-z0-9_-]{22}}"
        app.add_routes(
            [
                web.get("/", self.inbox),
                web.get("/signin", self.signin_form),
                web.post("/signin", self.signin),
                web.post("/signout", self.signout),
                web.get(mid, self.message),
                web.get(mid + "/frame", self.frame),
                web.get(mid + "/part/{n:[0-9]{1,4}}", self.part),
                web.get(mid + "/eml", self.eml),
            ]
        )
        return app

    # -- middlewares -----------------------------------------------------------------------------
    @web.middleware
    async def _headers_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resp = await handler(request)
        if not resp.prepared:
            self._secure_headers(request, resp)
        return resp

    def _secure_headers(self, request: web.Request, resp: web.StreamResponse) -> None:
        resp.headers["Server"] = "backupmx"  # not which Python or aiohttp
        set_security_headers(request, resp, SECURITY_HEADERS)
        if request.secure:
            resp.headers.setdefault("Strict-Transport-Security", "max-age=31536000")

    @web.middleware
    async def _errors_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Page as p:
            resp = self._render(request, p.template, status=p.status, **p.ctx)
            resp.headers.update(p.headers)
            return resp
        except web.HTTPException as e:
            if e.status in (404, 405):
                return self._render(
                    request, "notice.html", status=e.status, heading="not_found_title", body="not_found_body"
                )
            raise
        except (SpoolError, OSError) as e:
            log.error("continuity: %s on %s %s", e, request.method, request.path)
            return self._render(request, "notice.html", status=503, heading="error_title", body="unavailable")

    @web.middleware
    async def _gate_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Everything is refused while no domain's inbox is open; per-person checks come later."""
        if request.path.startswith("/static/"):
            return await handler(request)
        if not await self.gate.open_domains():
            raise _Page(403, "notice.html", heading="closed_title", body="closed_body", closed=True)
        return await handler(request)

    # -- helpers -----------------------------------------------------------------------------------
    def _lang(self, request: web.Request) -> str:
        forced = request.query.get("lang") or request.cookies.get(LANG_COOKIE)
        if forced in ("en", "ko"):
            return forced
        return choose(request.headers.get("Accept-Language"))

    def _render(self, request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
        lang = self._lang(request)
        t = Translator(lang)
        session: Session | None = ctx.pop("session", None)
        query = {k: v for k, v in request.query.items() if k != "lang"}
        other = "en" if lang == "ko" else "ko"
        html = self.env.get_template(template).render(
            t=t,
            lang=lang,
            session=session,
            csrf=self.signer.csrf_token(session.key) if session else "",
            switch_url=f"{request.path}?{urlencode({**query, 'lang': other})}",
            tz=self.tz,
            now=datetime.fromtimestamp(self.clock.now(), UTC),
            banner=ctx.pop("banner", None),
            **ctx,
        )
        resp = web.Response(text=html, content_type="text/html", charset="utf-8", status=status)
        if request.query.get("lang") in ("en", "ko"):
            resp.set_cookie(
                LANG_COOKIE,
                lang,
                max_age=365 * 86400,
                httponly=True,
                samesite="Strict",
                path="/",
                secure=self._secure(request),
            )
        return resp

    def _secure(self, request: web.Request) -> bool:
        return (
            request.secure
            or self.https
            or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
            or (self.config.continuity.base_url or "").startswith("https://")
        )

    def _same_origin(self, request: web.Request) -> bool:
        """The request's own origin, or the public one in sign-in links (base_url, behind a proxy)."""
        return same_origin(request, also=[self.config.continuity.public_url])

    @staticmethod
    def _actor(request: web.Request) -> str:
        return request.remote or "?"

    def _throttle(self, request: web.Request) -> None:
        """429 with Retry-After for a client network that spent its failed sign-ins (signinlimit.py)."""
        wait = self.limiter.retry_after(request.remote)
        if wait is not None:
            self.audit.refusal(
                self.clock.now(),
                "signin-refused",
                actor=self._actor(request),
                client=client_network(request.remote),
                why="rate-limited",
            )
            raise _Page(
                429, "notice.html", heading="slow_down_title", body="slow_down_body", headers={"Retry-After": str(wait)}
            )

    def _link_refused(self, request: web.Request, e: LinkRefused) -> _Page:
        """A link that cannot be used: counted against the client, audited (aggregated), its page."""
        self.limiter.failed(request.remote)
        self.audit.refusal(
            self.clock.now(),
            "signin-refused",
            actor=self._actor(request),
            client=client_network(request.remote),
            why=e.reason.value,
            address=e.address,
        )
        return _Page(403, "refused.html", reason=e.reason.value)

    async def _session(self, request: web.Request) -> tuple[Session, GateState]:
        """The signed-in person and their domain's gate; a page instead when there is none."""
        session = await self.access.session(request.cookies.get(COOKIE))
        if session is None:
            raise _Page(401, "notice.html", heading="need_link_title", body="need_link_body")
        state = await self.gate.state(session.address.rpartition("@")[2])
        if not state.open:
            raise _Page(403, "notice.html", heading="closed_title", body="closed_body", closed=True, session=session)
        return session, state

    def message_url(self, queue_id: str, address: str) -> str:
        return f"/m/{queue_id}/{self.signer.message_token(queue_id, address)}"

    async def _owned(self, request: web.Request, session: Session) -> MessageRecord:
        """The message of this URL when it is the session's; the same 404 page for every other case."""
        qid, tok = request.match_info["id"], request.match_info["tok"]
        if not self.signer.message_token_ok(qid, session.address, tok):
            self.audit.refusal(
                self.clock.now(),
                "view-refused",
                actor=self._actor(request),
                client=client_network(request.remote),
                why="token",
                address=session.address,
                id=qid,
            )
            raise _Page(404, "notice.html", heading="not_found_title", body="not_found_body", session=session)
        rec = await self.spool.get(QueueId(qid))
        if rec is None or not is_owned(rec, session.address):
            self.audit.refusal(
                self.clock.now(),
                "view-refused",
                actor=self._actor(request),
                client=client_network(request.remote),
                why="not held for this address",
                address=session.address,
                id=qid,
            )
            raise _Page(404, "notice.html", heading="not_found_title", body="not_found_body", session=session)
        return rec

    async def _parsed(self, rec: MessageRecord) -> ParsedMessage | TooLarge:
        async def body() -> bytes:
            return await self.spool.read_body(rec.id)

        return await self.views.view(rec.id, rec.size, body)

    def _too_large(
        self, request: web.Request, session: Session, state: GateState | None, rec: MessageRecord, big: TooLarge
    ) -> web.Response:
        """The page for a message past the view's budget: what it is and the .eml to download."""
        return self._render(
            request,
            "toolarge.html",
            session=session,
            banner=self._banner(state) if state is not None else None,
            m=rec,
            big=big,
            base=self.message_url(rec.id, session.address),
            compact_banner=True,
        )

    def _banner(self, state: GateState) -> dict[str, Any]:
        since = datetime.fromtimestamp(state.outage_since, UTC) if state.outage_since else None
        return {"domain": state.domain, "since": since, "outage": state.outage_since is not None}

    async def held_for(self, address: str) -> list[MessageRecord]:
        """The person's held messages, newest first, scanned page by page (at most MAX_LISTED kept)."""
        domain = address.rpartition("@")[2]
        flt = QueueFilter(domain=domain, recipient=address, pending_only=True)
        out: list[MessageRecord] = []
        after: QueueId | None = None
        while True:
            page = await self.spool.list_messages(flt, limit=500, after=after)
            out.extend(m for m in page if is_owned(m, address))  # the filter is a substring: check exactly
            if len(out) > MAX_LISTED:
                out = out[-MAX_LISTED:]
            if len(page) < 500:
                break
            after = page[-1].id
        out.reverse()
        return out

    # -- pages -------------------------------------------------------------------------------------
    async def inbox(self, request: web.Request) -> web.Response:
        session, state = await self._session(request)
        held = await self.held_for(session.address)
        try:
            page_no = max(1, min(10_000, int(request.query.get("page", "1"))))
        except ValueError:
            page_no = 1
        pages = max(1, -(-len(held) // PAGE_SIZE))
        page_no = min(page_no, pages)
        rows = []
        for m in held[(page_no - 1) * PAGE_SIZE : page_no * PAGE_SIZE]:
            try:
                head = await read_head(self.spool, m.id)
            except NotFound:
                continue  # delivered and purged a moment ago
            summary = await self.views.run(summarize, head)
            rows.append(Row(m.id, self.message_url(m.id, session.address), summary, m.size, m.received_at))
        self.audit.write(
            self.clock.now(), "list", actor=self._actor(request), address=session.address, count=len(held), page=page_no
        )
        return self._render(
            request,
            "inbox.html",
            session=session,
            banner=self._banner(state),
            rows=rows,
            total=len(held),
            page=page_no,
            pages=pages,
            title_key="title_inbox",
        )

    async def message(self, request: web.Request) -> web.Response:
        session, state = await self._session(request)
        rec = await self._owned(request, session)
        parsed = await self._parsed(rec)
        if isinstance(parsed, TooLarge):
            self.audit.write(
                self.clock.now(),
                "view",
                actor=self._actor(request),
                address=session.address,
                id=rec.id,
                shown="too-large",
            )
            return self._too_large(request, session, state, rec, parsed)
        view = request.query.get("view")
        show_html = parsed.html is not None and (view != "text" or parsed.text is None)
        remote = False
        if show_html and parsed.html is not None:
            remote = (await self.views.run(self.sanitize, parsed.html, parsed.inline_images)).remote_blocked
        base = self.message_url(rec.id, session.address)
        self.audit.write(self.clock.now(), "view", actor=self._actor(request), address=session.address, id=rec.id)
        return self._render(
            request,
            "message.html",
            session=session,
            banner=self._banner(state),
            m=rec,
            p=parsed,
            base=base,
            show_html=show_html,
            remote_blocked=remote,
            compact_banner=True,
            received=datetime.fromtimestamp(rec.received_at, UTC),
        )

    async def frame(self, request: web.Request) -> web.Response:
        """The HTML part, sanitised, as its own document for the sandboxed iframe."""
        session, _ = await self._session(request)
        rec = await self._owned(request, session)
        parsed = await self._parsed(rec)
        if isinstance(parsed, TooLarge) or parsed.html is None:
            raise web.HTTPNotFound()
        safe = await self.views.run(self.sanitize, parsed.html, parsed.inline_images)
        return web.Response(
            text=frame_document(safe.html, self._lang(request)),
            content_type="text/html",
            charset="utf-8",
            headers={
                "Content-Security-Policy": FRAME_CSP,
                "X-Frame-Options": "SAMEORIGIN",
                "Referrer-Policy": "no-referrer",
            },
        )

    async def part(self, request: web.Request) -> web.Response:
        session, state = await self._session(request)
        rec = await self._owned(request, session)
        parsed = await self._parsed(rec)
        if isinstance(parsed, TooLarge):
            return self._too_large(request, session, state, rec, parsed)
        found = attachment_bytes(parsed, int(request.match_info["n"]))
        if found is None:
            raise web.HTTPNotFound()
        att, data = found
        self.audit.write(
            self.clock.now(), "download", actor=self._actor(request), address=session.address, id=rec.id, part=att.index
        )
        return web.Response(
            body=data,
            headers={
                "Content-Type": "application/octet-stream",  # never rendered by the browser, whatever it claims
                "Content-Disposition": content_disposition(att.filename),
                "Content-Security-Policy": "default-src 'none'; sandbox",
            },
        )

    async def eml(self, request: web.Request) -> web.StreamResponse:
        session, _ = await self._session(request)
        rec = await self._owned(request, session)
        self.audit.write(
            self.clock.now(), "download", actor=self._actor(request), address=session.address, id=rec.id, part="eml"
        )
        resp = web.StreamResponse(
            headers={
                "Content-Type": "message/rfc822",
                "Content-Disposition": content_disposition(f"{rec.id}.eml"),
                "Content-Length": str(rec.size),
                "Content-Security-Policy": "default-src 'none'; sandbox",
            }
        )
        self._secure_headers(request, resp)
        chunks = self.spool.iter_body(rec.id)
        await resp.prepare(request)
        try:
            async for chunk in chunks:
                await resp.write(chunk)
        except (SpoolError, ConnectionResetError) as e:
            # the status line is gone: the reader sees a download shorter than its Content-Length
            log.error("continuity: %s.eml stopped after the headers: %s", rec.id, e)
            return resp
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        await resp.write_eof()
        return resp

    # -- signing in and out ------------------------------------------------------------------------
    async def _check_link(self, request: web.Request, token: str) -> tuple[str, float]:
        try:
            claims = await self.access.peek(token)
        except LinkRefused as e:
            raise self._link_refused(request, e) from None
        if not (await self.gate.state(claims.address.rpartition("@")[2])).open:
            self.audit.write(
                self.clock.now(),
                "signin-refused",
                actor=self._actor(request),
                address=claims.address,
                why=Refusal.CLOSED.value,
            )
            raise _Page(403, "notice.html", heading="closed_title", body="closed_body", closed=True)
        g = await self.access.grant_alive(claims.address, claims.grant_id)
        until = min(
            self.clock.now() + self.config.continuity.session_ttl.total_seconds(),
            g.expires_at if g else self.clock.now(),
        )
        return claims.address, until

    async def signin_form(self, request: web.Request) -> web.Response:
        """The page a link opens: a button, so a link previewer fetching it spends nothing."""
        self._throttle(request)
        token = request.query.get("t", "")
        address, until = await self._check_link(request, token)
        return self._render(
            request, "signin.html", token=token, address=address, until=datetime.fromtimestamp(until, UTC)
        )

    async def signin(self, request: web.Request) -> web.StreamResponse:
        if not self._same_origin(request):
            raise _Page(403, "notice.html", heading="error_title", body="bad_request")
        self._throttle(request)
        form = await request.post()
        token = form.get("t")
        if not isinstance(token, str):
            raise _Page(400, "notice.html", heading="error_title", body="bad_request")
        await self._check_link(request, token)
        try:
            session, cookie = await self.access.redeem(
                token, session_ttl=self.config.continuity.session_ttl.total_seconds(), used_by=self._actor(request)
            )
        except LinkRefused as e:
            raise self._link_refused(request, e) from None
        old = await self.access.session(request.cookies.get(COOKIE))
        if old is not None:
            await self.access.end_session(old)
        self.audit.write(
            self.clock.now(),
            "signin",
            actor=self._actor(request),
            address=session.address,
            until=int(session.expires_at),
        )
        resp = web.Response(status=303, headers={"Location": "/"})
        resp.set_cookie(
            COOKIE,
            cookie,
            max_age=max(1, int(session.expires_at - self.clock.now())),
            httponly=True,
            samesite="Strict",
            path="/",
            secure=self._secure(request),
        )
        return resp

    async def signout(self, request: web.Request) -> web.StreamResponse:
        session = await self.access.session(request.cookies.get(COOKIE))
        form = await request.post()
        csrf = form.get("csrf")
        if session is not None:
            if not self._same_origin(request) or not self.signer.csrf_ok(
                session.key, csrf if isinstance(csrf, str) else None
            ):
                raise _Page(403, "notice.html", heading="error_title", body="bad_request", session=session)
            await self.access.end_session(session)
            self.audit.write(self.clock.now(), "signout", actor=self._actor(request), address=session.address)
        resp = self._render(request, "notice.html", heading="signed_out", body=None)
        resp.del_cookie(COOKIE, path="/")
        return resp


def content_disposition(filename: str) -> str:
    """attachment, with an ASCII fallback name and the real one in RFC 5987 form."""
    fallback = re.sub(r"[^A-Za-z0-9._ -]", "_", filename).strip() or "attachment"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


# --- the listener -----------------------------------------------------------------------------------
class ContinuityServer:
    """The emergency inbox's listener. Construct, `await start()`, read `bound`/`url`, `await stop()`."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        health: HealthSnapshot | None,
        clock: Clock,
        *,
        outages: OutageSource | None = None,
        sanitize: Sanitizer = safe_html,
    ) -> None:
        from backupmx.continuity.gate import SpoolOutages

        self.config = config
        self.spool = spool
        self.clock = clock
        c = config.continuity
        self.signer = Signer(load_secret(c.secret_file or config.server.data_dir / SECRET_FILE))
        self.access = AccessStore(spool, self.signer, clock)
        source = outages or (MonitorOutages(health) if health is not None else SpoolOutages(spool))
        self.gate = Gate(spool, source, clock, [d.name for d in config.domains])
        self.audit = AuditLog(c.audit_log or config.server.data_dir / AUDIT_FILE, node=config.server.node)
        self.app = InboxApp(config, spool, self.gate, self.access, self.signer, self.audit, clock, sanitize=sanitize)
        self._runner: web.AppRunner | None = None
        self._bound: tuple[str, int] | None = None
        self._flusher: asyncio.Task[None] | None = None

    @property
    def bound(self) -> tuple[str, int]:
        if self._bound is None:
            raise RuntimeError("ContinuityServer is not started")
        return self._bound

    @property
    def url(self) -> str:
        return site_url("https" if self.config.continuity.tls_cert else "http", *self.bound)

    def _tls(self) -> ssl.SSLContext | None:
        c = self.config.continuity
        if c.tls_cert is None or c.tls_key is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(c.tls_cert), str(c.tls_key))
        return ctx

    async def start(self) -> None:
        host, port = self.config.continuity.listen_address
        self._runner, self._bound = await start_site(self.app.build(), host, port, ssl_context=self._tls())
        self._flusher = asyncio.create_task(self._flush_audit(), name="continuity-audit")
        log.info(
            "continuity: emergency inbox listening on %s (public address %s)",
            self.url,
            self.config.continuity.public_url,
        )

    async def _flush_audit(self) -> None:
        """Writes the count of each burst of refusals once it has ended, until cancelled."""
        while True:
            # real time, not self.clock: a housekeeping tick (a test's FakeClock would spin it)
            await asyncio.sleep(AUDIT_FLUSH_SECONDS)
            self.audit.flush(self.clock.now())

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.audit.flush(self.clock.now(), everything=True)
        self.app.views.close()
