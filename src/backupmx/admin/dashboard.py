"""The dashboard: server-rendered HTML pages (Jinja2 templates in templates/, autoescaped) on the admin
listener, for an operator at a desk or on a phone.

Pages: overview (`/`: every domain's primary state, outage timeline, queue depth and rates, with a banner
while an outage is declared), a domain (`/domains/NAME`: charts, outages, reroute), the queue
(`/queue`: search and per-message actions), a message (`/queue/ID`), and the recovery-guard holds
awaiting review (`/review`). Actions are POST forms with a CSRF token that redirect back (POST/redirect/GET)
and call the same `Operations` as the API. Login exchanges the admin token for a session cookie.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, Protocol
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from backupmx import __version__
from backupmx.admin import charts
from backupmx.admin.auth import COOKIE, AdminAuth
from backupmx.admin.operations import ActionError, Operations, queue_filter
from backupmx.clock import format_span
from backupmx.model import QueueId, RecipientState
from backupmx.monitor import DestinationState
from backupmx.signinlimit import FailureLimiter
from backupmx.weblisten import same_site_path

STATIC_DIR = Path(__file__).parent / "static"
PAGE_SIZE = 50


class AlertView(Protocol):
    def firing(self) -> list[dict[str, object]]: ...


def age(seconds: float | None) -> str:
    """1d 4h, 3h 12m, 5m, 42s."""
    return "—" if seconds is None else format_span(seconds)


def when(t: float | None) -> str:
    if t is None:
        return "—"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


def nbytes(n: int | None) -> str:
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def rate(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"


def _safe_next(target: str | None, default: str = "/") -> str:
    """Only paths on this site after normalising (no //host, /\\host, control characters, schemes)."""
    return same_site_path(target, default)


# The notices an action's redirect may show (`?done=CODE`): fixed texts, never text from the URL. The
# values put in are checked: `n` a count, `msg` a queue ID, `dom` a protected domain (names of their own,
# so that they never clash with a page's filters such as /queue?domain= or its jump box's id=).
NOTICES = {
    "held": "Held {id} ({n} recipient(s)).",
    "released": "Released {id} ({n} recipient(s)); delivery was woken.",
    "deleted": "Deleted {id}.",
    "flushed": "Flushed {domain}: {n} recipient(s) due now.",
    "held-domain": "Held {n} recipient(s) of {domain}.",
    "released-domain": "Released {n} held recipient(s) of {domain}.",
    "released-guard": "Released {n} recovery-guard hold(s) of {domain}: they will be tried again now.",
    "rerouted": "{domain} now goes to {hosts}; {n} recipient(s) flushed.",
    "unrerouted": "{domain} goes to its primary again.",
    "not-rerouted": "{domain} was not rerouted.",
}
_QUEUE_ID = re.compile(r"[0-9A-Z]{14}")


STATE_LABELS = {
    DestinationState.UP: "up",
    DestinationState.DOWN: "down",
    DestinationState.RECOVERING: "recovering",
    DestinationState.UNKNOWN: "not probed yet",
}


class Dashboard:
    def __init__(
        self,
        ops: Operations,
        auth: AdminAuth,
        *,
        alerts: AlertView | None = None,
        limiter: FailureLimiter | None = None,
    ) -> None:
        self.ops = ops
        self.limiter = limiter or FailureLimiter(ops.clock)
        self.auth = auth
        self.alerts = alerts
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("backupmx.admin", "templates"),
            autoescape=True,
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters.update(age=age, when=when, nbytes=nbytes, rate=rate)
        self.env.globals.update(
            version=__version__, State=DestinationState, RState=RecipientState, state_label=STATE_LABELS
        )

    def add_routes(self, app: web.Application) -> None:
        app.router.add_static("/static", STATIC_DIR, append_version=False)
        app.add_routes(
            [
                web.get("/login", self.login_form),
                web.post("/login", self.login),
                web.post("/logout", self.logout),
                web.get("/", self.overview),
                web.get("/domains/{domain}", self.domain),
                web.get("/queue", self.queue),
                web.get("/queue/{id}", self.message),
                web.get("/review", self.review),
                web.post("/ui/queue/{id}/{action:hold|release|delete}", self.message_action),
                web.post(
                    "/ui/domains/{domain}/{action:flush|hold|release|release-guard|reroute|unreroute}",
                    self.domain_action,
                ),
            ]
        )

    # -- rendering -------------------------------------------------------------------------------
    def _render(self, request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
        nonce = self.auth.session_nonce(request.cookies.get(COOKIE))
        ctx.setdefault("outages", [])
        ctx.setdefault("guard_total", 0)
        ctx.setdefault("refresh", 0)
        html = self.env.get_template(template).render(
            node=self.ops.config.server.node,
            csrf=self.auth.csrf_token(nonce) if nonce else "",
            logged_in=nonce is not None,
            path=request.path,
            here=request.rel_url.raw_path_qs,
            flash=self._notice(request.query),
            problem=ctx.pop("problem", ""),
            now=self.ops.clock.now(),
            alerts=self.alerts.firing() if self.alerts else [],
            **ctx,
        )
        return web.Response(text=html, content_type="text/html", charset="utf-8", status=status)

    def _notice(self, query: Mapping[str, str]) -> str:
        """The text of `?done=CODE` from NOTICES, filled with checked values only; "" for anything else."""
        text = NOTICES.get(query.get("done", ""))
        if text is None:
            return ""
        n, qid, domain = query.get("n", ""), query.get("msg", ""), query.get("dom", "").lower()
        if (
            not n.isdigit()
            or len(n) > 9
            or (qid and not _QUEUE_ID.fullmatch(qid))
            or (domain and domain not in self.ops.domain_names)
        ):
            return ""
        hosts = ", ".join(self.ops.reroutes().get(domain) or ()) if domain else ""
        return text.format(n=int(n), id=qid or "the message", domain=domain or "the domain", hosts=hosts or "?")

    def error_page(self, request: web.Request, status: int, message: str, *, back: str = "/") -> web.Response:
        return self._render(request, "error.html", status=status, title=f"Error {status}", message=message, back=back)

    async def _chrome(self) -> dict[str, Any]:
        """What every page shows: the outage banner and the review count."""
        snap = await self.ops.snapshot()
        return {"snap": snap, "outages": snap.outages, "guard_total": sum(d.guard_held for d in snap.domains)}

    # -- login -------------------------------------------------------------------------------------
    async def login_form(self, request: web.Request) -> web.Response:
        return self._render(
            request, "login.html", title="Log in", next=_safe_next(request.query.get("next")), wrong=False
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        token = form.get("token")
        target = _safe_next(str(form.get("next") or ""))
        wait = self.limiter.retry_after(request.remote)
        if wait is not None:  # refused before the token is even compared
            resp = self.error_page(
                request, 429, f"Too many wrong tokens came from your network. Try again in {format_span(wait)}."
            )
            resp.headers["Retry-After"] = str(wait)
            return resp
        if not isinstance(token, str) or not self.auth.token_ok(token):
            self.limiter.failed(request.remote)
            return self._render(request, "login.html", status=401, title="Log in", next=target, wrong=True)
        resp = web.Response(status=303, headers={"Location": target})
        resp.set_cookie(
            COOKIE,
            self.auth.new_session(),
            max_age=int(self.auth.session_seconds),
            httponly=True,
            samesite="Strict",
            path="/",
            secure=_is_https(request),
        )
        return resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self.auth.revoke(request.cookies.get(COOKIE))
        resp = web.Response(status=303, headers={"Location": "/login"})
        resp.del_cookie(COOKIE, path="/")
        return resp

    # -- pages ---------------------------------------------------------------------------------------
    async def overview(self, request: web.Request) -> web.Response:
        chrome = await self._chrome()
        snap = chrome["snap"]
        now = snap.at
        cards = []
        for d in snap.domains:
            outages = await self.ops.outages(d.domain)
            points = await self.ops.series_points(d.domain)
            cards.append(
                {
                    "d": d,
                    "timeline": charts.outage_timeline(
                        outages, now=now, down_now=d.primary.state is DestinationState.DOWN
                    ),
                    "depth": charts.depth_chart(points, outages, now=now),
                    "rates": charts.rates_chart(points, outages, now=now),
                }
            )
        return self._render(request, "overview.html", title="Overview", cards=cards, refresh=30, **chrome)

    async def domain(self, request: web.Request) -> web.Response:
        name = self.ops.require_domain(request.match_info["domain"])
        chrome = await self._chrome()
        snap = chrome["snap"]
        d = snap.domain(name)
        outages = await self.ops.outages(name)
        points = await self.ops.series_points(name)
        dc = self.ops.config.domain(name)
        return self._render(
            request,
            "domain.html",
            title=name,
            d=d,
            outages_24h=outages,
            timeline=charts.outage_timeline(outages, now=snap.at, down_now=d.primary.state is DestinationState.DOWN),
            depth=charts.depth_chart(points, outages, now=snap.at),
            rates=charts.rates_chart(points, outages, now=snap.at),
            primary_hosts=", ".join(dc.primary) if dc else "",
            **chrome,
        )

    async def queue(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        jump = (q.get("id") or "").strip().upper()
        if jump:
            raise web.HTTPSeeOther(f"/queue/{jump}" if jump.isalnum() else "/queue")
        flt = queue_filter(q)
        after = q.get("after") or None
        page, nxt = await self.ops.queue_page(flt, after=QueueId(after) if after else None, limit=PAGE_SIZE)
        chrome = await self._chrome()
        args = {k: v for k, v in q.items() if k in ("domain", "recipient", "sender", "state", "all") and v}
        return self._render(
            request,
            "queue.html",
            title="Queue",
            messages=page,
            flt=flt,
            args=args,
            next_url=f"/queue?{urlencode({**args, 'after': nxt})}" if nxt else None,
            first_url=f"/queue?{urlencode(args)}" if after else None,
            domains=self.ops.domain_names,
            states=[s.value for s in RecipientState],
            **chrome,
        )

    async def message(self, request: web.Request) -> web.Response:
        detail = await self.ops.message_detail(request.match_info["id"])
        chrome = await self._chrome()
        m = detail.message
        subject = next((v for k, v in detail.headers if k.lower() == "subject"), "")
        waiting = {
            d.domain for d in chrome["snap"].domains if d.primary.state is DestinationState.DOWN and not d.reroute
        }
        return self._render(
            request,
            "message.html",
            title=f"Message {m.id}",
            m=m,
            detail=detail,
            subject=subject,
            waiting_domains=waiting,
            has_queued=any(r.state is RecipientState.QUEUED for r in m.recipients),
            has_held=any(r.state is RecipientState.HELD for r in m.recipients),
            **chrome,
        )

    async def review(self, request: web.Request) -> web.Response:
        domain = request.query.get("domain") or None
        if domain:
            domain = self.ops.require_domain(domain)
        holds = await self.ops.guard_holds(domain, max_pages=10)
        chrome = await self._chrome()
        per_domain: dict[str, int] = {}
        for g in holds:
            per_domain[g.recipient.domain] = per_domain.get(g.recipient.domain, 0) + 1
        return self._render(
            request, "review.html", title="Review", holds=holds, per_domain=per_domain, domain=domain, **chrome
        )

    # -- actions -----------------------------------------------------------------------------------
    async def message_action(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        qid, action = request.match_info["id"], request.match_info["action"]
        back = _safe_next(_field(form, "back"), f"/queue/{qid}")
        try:
            if action == "hold":
                done, n = "held", await self.ops.hold_message(qid, actor="dashboard")
            elif action == "release":
                done, n = "released", await self.ops.release_message(qid, actor="dashboard")
            else:
                await self.ops.delete_message(qid, actor="dashboard")
                done, n = "deleted", 1
                if back.startswith(f"/queue/{qid}"):
                    back = "/queue"
        except ActionError as e:  # shown on this POST's answer: the error's text never travels in a URL
            return self.error_page(request, 400, str(e), back=back)
        _back(back, done=done, n=str(n), msg=qid)

    async def domain_action(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        name, action = request.match_info["domain"], request.match_info["action"]
        back = _safe_next(_field(form, "back"), f"/domains/{name}")
        n = 0
        try:
            if action == "flush":
                done, n = "flushed", await self.ops.flush(name, actor="dashboard")
            elif action == "hold":
                done, n = "held-domain", await self.ops.hold_domain(name, actor="dashboard")
            elif action == "release":
                done, n = "released-domain", await self.ops.release_domain(name, actor="dashboard")
            elif action == "release-guard":
                done, n = (
                    "released-guard",
                    await self.ops.release_domain(name, reason="recovery-guard", actor="dashboard"),
                )
            elif action == "reroute":
                hosts = _field(form, "hosts")
                n, _released = await self.ops.reroute(
                    name, hosts, actor="dashboard", release_held=_field(form, "release_held") == "on"
                )
                done = "rerouted"
            else:
                was = await self.ops.clear_reroute(name, actor="dashboard")
                done = "unrerouted" if was else "not-rerouted"
        except ActionError as e:
            return self.error_page(request, 400, str(e), back=back)
        _back(back, done=done, n=str(n), dom=self.ops.require_domain(name))


def _field(form: Mapping[str, Any], name: str) -> str:
    v = form.get(name)
    return v if isinstance(v, str) else ""


def _back(path: str, **notice: str) -> NoReturn:
    """303 to `path` (already a same-site path) with the notice's code and values, replacing any before."""
    base, _, query = path.partition("?")
    kept = "&".join(p for p in query.split("&") if p and p.split("=", 1)[0] not in ("done", "problem", *notice))
    extra = urlencode(notice)
    raise web.HTTPSeeOther(f"{base}?{kept + '&' if kept else ''}{extra}")


def _is_https(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
