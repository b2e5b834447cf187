"""The admin listener (`AdminServer`) and its JSON API under /api/, plus /healthz and /metrics.

One aiohttp application on `[admin] listen` (loopback by default) serves the API, the dashboard
(dashboard.py) and Prometheus metrics. Every /api/ call needs `Authorization: Bearer TOKEN` or the
dashboard's session cookie (+ CSRF token on changes); without one it gets 401. /healthz needs nothing;
/metrics needs nothing on a loopback listener and the token elsewhere. The endpoint table below is
also the source of /api/openapi.json, so the description cannot drift from the routes.
Errors are JSON `{"error": "..."}`: 400 bad input, 401, 403 (CSRF), 404, 503 (spool unavailable).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

from aiohttp import web

from backupmx import __version__
from backupmx.admin.auth import COOKIE, AdminAuth, listen_address, load_token
from backupmx.admin.mailevents import MailTally, MessageHistory
from backupmx.admin.metrics import CONTENT_TYPE, Metrics
from backupmx.admin.operations import (
    ActionError,
    DeliveryControl,
    HealthView,
    Operations,
    SmtpView,
    iso,
    message_json,
    queue_filter,
)
from backupmx.admin.timeseries import SAMPLE_SECONDS, SeriesSampler, SeriesStore
from backupmx.clock import Clock
from backupmx.config import Config, is_loopback
from backupmx.errors import NotFound, SpoolError
from backupmx.maillog import MailLog
from backupmx.model import QueueId, RecipientState
from backupmx.signinlimit import FailureLimiter
from backupmx.spool import Spool
from backupmx.weblisten import same_origin, set_security_headers, site_url, start_site

log = logging.getLogger("backupmx.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
QUEUE_ID = "{id:[0-9A-Z]{14}}"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" makes Chromium send Origin: null on our own forms
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
}


class AlertView(Protocol):
    """The alert manager (monitor/alerts.py), as far as the admin side shows it."""

    def firing(self) -> list[dict[str, object]]: ...


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False))


def _error(status: int, message: str) -> web.Response:
    resp = _json({"error": message}, status=status)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="backupmx"'
    return resp


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object sent, or the form fields; {} when empty."""
    if not request.can_read_body:
        return {}
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    try:
        data = await request.json()
    except ValueError:
        raise ActionError("the body is not JSON") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ActionError("the body must be a JSON object")
    return data


def _int_arg(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return max(lo, min(hi, int(raw)))
    except ValueError:
        raise ActionError(f"{name}: not a number") from None


# --- the endpoint table (routes and OpenAPI both come from it) -------------------------------------
@dataclass(frozen=True, slots=True)
class Param:
    name: str
    where: str  # "path" | "query"
    description: str
    schema: str = "string"


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    handler: str
    summary: str
    params: tuple[Param, ...] = ()
    body: str | None = None  # schema name in components
    response: str = "Count"
    auth: bool = True
    tag: str = "queue"


DOMAIN = Param("domain", "path", "a protected domain name")
QID = Param("id", "path", "a queue ID (14 characters)")
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        "/healthz",
        "healthz",
        "Liveness for load balancers: 200 when the spool answers, else 503.",
        response="Health",
        auth=False,
        tag="node",
    ),
    Endpoint(
        "GET",
        "/api/status",
        "status",
        "The node: spool totals, disk, SMTP sessions, every domain.",
        response="Status",
        tag="node",
    ),
    Endpoint(
        "GET", "/api/domains", "domains", "Status of each protected domain.", response="DomainList", tag="domains"
    ),
    Endpoint(
        "GET",
        "/api/domains/{domain}",
        "domain",
        "Status of one domain with its outages (last 24 h).",
        (DOMAIN,),
        response="DomainDetail",
        tag="domains",
    ),
    Endpoint(
        "GET",
        "/api/domains/{domain}/series",
        "series",
        "Per-minute queue depth and arrival/delivery counts.",
        (DOMAIN, Param("hours", "query", "how far back, 1-25 (default 24)", "integer")),
        response="Series",
        tag="domains",
    ),
    Endpoint(
        "POST",
        "/api/domains/{domain}/flush",
        "flush_domain",
        "Make the domain's queued mail due now.",
        (DOMAIN,),
        tag="domains",
    ),
    Endpoint(
        "POST",
        "/api/domains/{domain}/hold",
        "hold_domain",
        "Hold all of the domain's queued mail.",
        (DOMAIN,),
        tag="domains",
    ),
    Endpoint(
        "POST",
        "/api/domains/{domain}/release",
        "release_domain",
        "Release the domain's held mail (only the recovery guard's with reason=recovery-guard).",
        (DOMAIN,),
        body="Release",
        tag="domains",
    ),
    Endpoint(
        "PUT",
        "/api/domains/{domain}/reroute",
        "reroute",
        "Deliver the domain's mail to other host:port(s) (a temporary server) instead of its primary, "
        "and flush it now. Survives a restart until DELETE.",
        (DOMAIN,),
        body="Reroute",
        response="RerouteResult",
        tag="domains",
    ),
    Endpoint(
        "DELETE",
        "/api/domains/{domain}/reroute",
        "clear_reroute",
        "Undo a reroute: back to the primary.",
        (DOMAIN,),
        response="RerouteResult",
        tag="domains",
    ),
    Endpoint(
        "GET",
        "/api/queue",
        "queue",
        "A page of messages in arrival order, filtered.",
        (
            Param("domain", "query", "recipient domain"),
            Param("recipient", "query", "substring of a recipient address"),
            Param("sender", "query", "substring of the sender address"),
            Param("state", "query", "queued | held | delivered | bounced | expired"),
            Param("all", "query", "1 to include messages with no pending recipient"),
            Param("after", "query", "the `next` of the previous page"),
            Param("limit", "query", "page size, 1-500 (default 100)", "integer"),
        ),
        response="QueuePage",
    ),
    Endpoint("POST", "/api/queue/flush", "flush_all", "Make all queued mail due now."),
    Endpoint(
        "GET",
        "/api/queue/guard-holds",
        "guard_holds",
        "Recipients held by the recovery guard (a 5xx after an outage), awaiting review.",
        (Param("domain", "query", "only this domain"),),
        response="GuardHolds",
    ),
    Endpoint(
        "GET",
        f"/api/queue/{QUEUE_ID}",
        "message",
        "One message: envelope, headers, per-recipient state and recent history.",
        (QID,),
        response="MessageDetail",
    ),
    Endpoint(
        "GET",
        f"/api/queue/{QUEUE_ID}/body",
        "message_body",
        "The stored message (message/rfc822).",
        (QID,),
        response="Body",
    ),
    Endpoint("POST", f"/api/queue/{QUEUE_ID}/hold", "hold_message", "Hold the message's queued recipients.", (QID,)),
    Endpoint(
        "POST", f"/api/queue/{QUEUE_ID}/release", "release_message", "Release the message's held recipients.", (QID,)
    ),
    Endpoint("DELETE", f"/api/queue/{QUEUE_ID}", "delete_message", "Delete the message (no DSN is sent).", (QID,)),
    Endpoint("GET", "/api/alerts", "alerts", "Alerts firing now.", response="Alerts", tag="node"),
    Endpoint("GET", "/api/openapi.json", "openapi", "This description.", response="OpenAPI", auth=False, tag="node"),
)


class Api:
    """The JSON handlers; each one is a thin shell over Operations."""

    def __init__(self, ops: Operations, alerts: AlertView | None = None) -> None:
        self.ops = ops
        self.alerts_view = alerts

    def routes(self) -> list[web.RouteDef]:
        return [web.route(e.method, e.path, getattr(self, e.handler)) for e in ENDPOINTS]

    def _now(self) -> float:
        return self.ops.clock.now()

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(self.ops.spool.get(QueueId("00000000000000")), timeout=5.0)
        except Exception as e:
            return _json({"status": "unavailable", "error": type(e).__name__}, status=503)
        return _json({"status": "ok", "node": self.ops.config.server.node, "version": __version__})

    async def status(self, request: web.Request) -> web.Response:
        snap = await self.ops.snapshot()
        st = snap.stats
        return _json(
            {
                "node": snap.node,
                "version": __version__,
                "at": iso(snap.at),
                "spool": {
                    "messages_pending": st.messages_pending,
                    "recipients_by_state": st.recipients_by_state,
                    "oldest_pending_at": iso(st.oldest_pending_at),
                    "corrupt": st.corrupt,
                    "bytes_on_disk": st.bytes_on_disk,
                    "other_domains_pending": snap.other_pending,
                },
                "disk_free_bytes": snap.disk_free_bytes,
                "smtp_sessions_open": snap.smtp_sessions_open,
                "outages_declared": [d.domain for d in snap.outages],
                "domains": [d.to_json(snap.at) for d in snap.domains],
                "alerts": self._firing(),
            }
        )

    def _firing(self) -> list[dict[str, object]]:
        return self.alerts_view.firing() if self.alerts_view is not None else []

    async def domains(self, request: web.Request) -> web.Response:
        snap = await self.ops.snapshot()
        return _json({"domains": [d.to_json(snap.at) for d in snap.domains]})

    async def domain(self, request: web.Request) -> web.Response:
        name = self.ops.require_domain(request.match_info["domain"])
        snap = await self.ops.snapshot()
        doc = snap.domain(name).to_json(snap.at)
        doc["outages"] = [
            {"started_at": iso(o.started_at), "ended_at": iso(o.ended_at)} for o in await self.ops.outages(name)
        ]
        return _json(doc)

    async def series(self, request: web.Request) -> web.Response:
        name = self.ops.require_domain(request.match_info["domain"])
        hours = _int_arg(request, "hours", 24, 1, 25)
        points = await self.ops.series_points(name, hours=hours)
        return _json(
            {
                "domain": name,
                "interval_seconds": int(SAMPLE_SECONDS),
                "points": [
                    {
                        "at": iso(p.at),
                        "queued": p.queued,
                        "held": p.held,
                        "arrived": p.arrived,
                        "delivered": p.delivered,
                        "deferred": p.deferred,
                        "bounced": p.bounced,
                    }
                    for p in points
                ],
            }
        )

    async def flush_domain(self, request: web.Request) -> web.Response:
        n = await self.ops.flush(request.match_info["domain"], actor=_actor(request))
        return _json({"flushed": n})

    async def flush_all(self, request: web.Request) -> web.Response:
        return _json({"flushed": await self.ops.flush(None, actor=_actor(request))})

    async def hold_domain(self, request: web.Request) -> web.Response:
        return _json({"held": await self.ops.hold_domain(request.match_info["domain"], actor=_actor(request))})

    async def release_domain(self, request: web.Request) -> web.Response:
        body = await _body(request)
        reason = body.get("reason") or request.query.get("reason") or None
        n = await self.ops.release_domain(request.match_info["domain"], reason=reason, actor=_actor(request))
        return _json({"released": n})

    async def reroute(self, request: web.Request) -> web.Response:
        body = await _body(request)
        release = body.get("release_held") in (True, "1", "true", "on", "yes")
        name = request.match_info["domain"]
        flushed, released = await self.ops.reroute(name, body.get("hosts"), release_held=release, actor=_actor(request))
        d = self.ops.require_domain(name)
        return _json({"domain": d, "reroute": list(self.ops.reroutes()[d]), "flushed": flushed, "released": released})

    async def clear_reroute(self, request: web.Request) -> web.Response:
        name = request.match_info["domain"]
        was = await self.ops.clear_reroute(name, actor=_actor(request))
        return _json({"domain": self.ops.require_domain(name), "reroute": None, "was_rerouted": was})

    async def queue(self, request: web.Request) -> web.Response:
        flt = queue_filter(request.query)
        after = request.query.get("after") or None
        limit = _int_arg(request, "limit", 100, 1, 500)
        page, nxt = await self.ops.queue_page(flt, after=QueueId(after) if after else None, limit=limit)
        return _json({"messages": [message_json(m) for m in page], "count": len(page), "next": nxt})

    async def guard_holds(self, request: web.Request) -> web.Response:
        domain = request.query.get("domain") or None
        if domain:
            domain = self.ops.require_domain(domain)
        holds = await self.ops.guard_holds(domain, max_pages=10)
        return _json(
            {
                "holds": [
                    {
                        "id": g.message.id,
                        "address": g.recipient.address,
                        "domain": g.recipient.domain,
                        "sender": g.message.envelope.sender,
                        "received_at": iso(g.message.received_at),
                        "last_reply": g.recipient.last_reply,
                        "held_at": iso(g.recipient.updated_at or None),
                    }
                    for g in holds
                ]
            }
        )

    async def message(self, request: web.Request) -> web.Response:
        detail = await self.ops.message_detail(request.match_info["id"])
        doc = message_json(detail.message)
        doc["envelope"] = detail.message.envelope.to_json()
        doc["headers"] = [[k, v] for k, v in detail.headers]
        doc["history"] = [{"at": iso(h.at), "event": h.event, **h.fields} for h in detail.history]
        return _json(doc)

    async def message_body(self, request: web.Request) -> web.StreamResponse:
        m = await self.ops.message(request.match_info["id"])
        resp = web.StreamResponse(
            headers={
                "Content-Type": "message/rfc822",
                "Content-Disposition": f'attachment; filename="{m.id}.eml"',
                "Content-Length": str(m.size),
            }
        )
        chunks = self.ops.spool.iter_body(m.id)
        started = False
        try:
            async for chunk in chunks:
                if not started:
                    await resp.prepare(request)
                    started = True
                await resp.write(chunk)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if not started:
            await resp.prepare(request)
        await resp.write_eof()
        return resp

    async def hold_message(self, request: web.Request) -> web.Response:
        qid = request.match_info["id"]
        return _json({"id": qid, "held": await self.ops.hold_message(qid, actor=_actor(request))})

    async def release_message(self, request: web.Request) -> web.Response:
        qid = request.match_info["id"]
        return _json({"id": qid, "released": await self.ops.release_message(qid, actor=_actor(request))})

    async def delete_message(self, request: web.Request) -> web.Response:
        qid = request.match_info["id"]
        if not await self.ops.delete_message(qid, actor=_actor(request)):
            raise NotFound(f"no message {qid}")
        return _json({"id": qid, "deleted": True})

    async def alerts(self, request: web.Request) -> web.Response:
        return _json({"alerts": self._firing()})

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(openapi_spec())


def _actor(request: web.Request) -> str:
    """Who acted, for the audit line: a script with the token, or someone in the dashboard."""
    return "api" if request.headers.get("Authorization") else "dashboard"


# --- the listener ---------------------------------------------------------------------------------
class AdminServer:
    """The admin listener: API, dashboard and /metrics on `[admin] listen`, plus the per-minute sampler
    of the chart data. Construct, `await start()`, read `bound`, `await stop()`."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        health: HealthView | None,
        engine: DeliveryControl | None,
        smtp_stats: SmtpView | None,
        maillog: MailLog,
        clock: Clock,
        *,
        alerts: AlertView | None = None,
        sample_interval: float = SAMPLE_SECONDS,
    ) -> None:
        self.config = config
        self.clock = clock
        names = [d.name for d in config.domains]
        self.tally = MailTally(names)
        self.history = MessageHistory()
        maillog.subscribe(self.tally.listener)
        maillog.subscribe(self.history.listener)
        self.series = SeriesStore(config.server.data_dir / "metrics.db")
        self.ops = Operations(
            config, spool, health, engine, smtp_stats, maillog, clock, series=self.series, history=self.history
        )
        self.metrics = Metrics(self.ops, self.tally)
        self.sampler = SeriesSampler(self.series, spool, self.tally, names, clock, interval=sample_interval)
        self.alerts = alerts
        self.auth: AdminAuth | None = None
        self.limiter = FailureLimiter(clock)  # wrong tokens, per client network: 429 past the limit
        self._runner: web.AppRunner | None = None
        self._sampler_task: asyncio.Task[None] | None = None
        self._bound: tuple[str, int] | None = None
        self._loopback = True

    @property
    def bound(self) -> tuple[str, int]:
        if self._bound is None:
            raise RuntimeError("AdminServer is not started")
        return self._bound

    @property
    def url(self) -> str:
        return site_url("http", *self.bound)

    async def start(self) -> None:
        host, port = listen_address(self.config)  # ConfigError on a non-loopback listener without a token
        self._loopback = is_loopback(host)
        self.auth = AdminAuth(load_token(self.config))
        await asyncio.to_thread(self.series.open)
        await self.ops.sync_reroutes()
        self._runner, self._bound = await start_site(self.build_app(), host, port)
        self._sampler_task = asyncio.create_task(self._every_minute(), name="admin-sampler")
        log.info("admin listener on %s (dashboard, /api/, /metrics)", self.url)

    async def _every_minute(self) -> None:
        """The chart sample and the reroute sync, at each interval boundary, until cancelled."""
        interval = self.sampler.interval
        while True:
            now = self.clock.now()
            await self.clock.sleep(interval - (now % interval) or interval)
            for job in (self.sampler.sample, self.ops.sync_reroutes):
                try:
                    await job()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # charts and syncing must never take the node down
                    log.warning("admin: %s failed: %s", job.__name__, e)

    async def stop(self) -> None:
        if self._sampler_task is not None:
            self._sampler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler_task
            self._sampler_task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await asyncio.to_thread(self.series.close)

    def build_app(self) -> web.Application:
        from backupmx.admin.dashboard import Dashboard

        assert self.auth is not None
        dashboard = Dashboard(self.ops, self.auth, alerts=self.alerts, limiter=self.limiter)
        app = web.Application(
            middlewares=[self._headers_mw, self._errors_mw(dashboard), self._auth_mw], client_max_size=1024 * 1024
        )
        app.add_routes(Api(self.ops, self.alerts).routes())
        app.router.add_get("/metrics", self._metrics)
        dashboard.add_routes(app)
        return app

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    @web.middleware
    async def _headers_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resp = await handler(request)
        if not resp.prepared:
            set_security_headers(request, resp, SECURITY_HEADERS)
        return resp

    def _errors_mw(self, dashboard: Any) -> Any:
        @web.middleware
        async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
            api = request.path.startswith("/api/") or request.path in ("/metrics", "/healthz")
            try:
                return await handler(request)
            except web.HTTPException as e:
                if api and e.status >= 400:
                    return _error(e.status, e.reason)
                raise
            except NotFound as e:
                return _error(404, str(e)) if api else dashboard.error_page(request, 404, str(e))
            except ActionError as e:
                return _error(400, str(e)) if api else dashboard.error_page(request, 400, str(e))
            except SpoolError as e:
                log.error("admin: spool error on %s %s: %s", request.method, request.path, e)
                msg = "the spool is not available right now; try again"
                return _error(503, msg) if api else dashboard.error_page(request, 503, msg)

        return errors

    @web.middleware
    async def _auth_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        auth = self.auth
        assert auth is not None
        path = request.path
        if path in ("/healthz", "/api/openapi.json", "/login") or path.startswith("/static/"):
            return await handler(request)
        if path == "/metrics" and self._loopback:
            return await handler(request)
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            wait = self.limiter.retry_after(request.remote)
            if wait is not None:
                resp = _error(429, "too many wrong tokens from your network; try again later")
                resp.headers["Retry-After"] = str(wait)
                return resp
            if auth.bearer_ok(authorization):
                return await handler(request)
            self.limiter.failed(request.remote)
        nonce = auth.session_nonce(request.cookies.get(COOKIE))
        if nonce is not None:
            if request.method not in SAFE_METHODS:
                if not same_origin(request):
                    return _error(403, "cross-origin request refused")
                presented = request.headers.get("X-CSRF-Token")
                if presented is None and request.content_type == "application/x-www-form-urlencoded":
                    csrf = (await request.post()).get("csrf")
                    presented = csrf if isinstance(csrf, str) else None
                if not auth.csrf_ok(nonce, presented):
                    return _error(403, "missing or wrong CSRF token; reload the page")
            return await handler(request)
        if path.startswith("/api/") or path == "/metrics":
            return _error(401, "missing or wrong token")
        if request.method in SAFE_METHODS:
            # the target encoded whole, so its own "&" and "?" stay in it; /login checks it again
            raise web.HTTPSeeOther("/login?" + urlencode({"next": request.rel_url.raw_path_qs}))
        return _error(401, "log in first")


# --- OpenAPI ---------------------------------------------------------------------------------------
def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_OBJ: dict[str, Any] = {"type": "object"}
_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
    "Count": {
        "type": "object",
        "description": "how many recipients (or messages) the action changed",
        "additionalProperties": {"type": "integer"},
    },
    "Health": {
        "type": "object",
        "properties": {"status": {"type": "string", "enum": ["ok", "unavailable"]}, "node": {"type": "string"}},
    },
    "Primary": {
        "type": "object",
        "properties": {
            "state": {"type": "string", "enum": ["unknown", "up", "down", "recovering"]},
            "since": {"type": "string", "format": "date-time"},
            "last_probe_at": {"type": "string", "nullable": True},
            "last_error": {"type": "string", "nullable": True},
            "consecutive_failures": {"type": "integer"},
            "target": {"type": "string", "nullable": True},
            "recovered_at": {"type": "string", "nullable": True},
        },
    },
    "Domain": {
        "type": "object",
        "properties": {
            "domain": {"type": "string"},
            "primary": _ref("Primary"),
            "outage": {
                "type": "object",
                "properties": {
                    "declared": {"type": "boolean"},
                    "since": {"type": "string", "nullable": True},
                    "duration_seconds": {"type": "integer", "nullable": True},
                },
            },
            "recipients": {
                "type": "object",
                "properties": {k: {"type": "integer"} for k in ("queued", "held", "guard_held", "pending")},
            },
            "messages_pending": {"type": "integer"},
            "oldest_pending_at": {"type": "string", "nullable": True},
            "oldest_age_seconds": {"type": "integer", "nullable": True},
            "arrivals_per_minute": {"type": "number", "nullable": True},
            "deliveries_per_minute": {"type": "number", "nullable": True},
            "drain_eta_seconds": {
                "type": "integer",
                "nullable": True,
                "description": "null: not draining (primary down, or arrivals outpace deliveries)",
            },
            "reroute": {"type": "array", "items": {"type": "string"}, "nullable": True},
            "concurrency": {"type": "integer", "nullable": True},
        },
    },
    "DomainList": {"type": "object", "properties": {"domains": {"type": "array", "items": _ref("Domain")}}},
    "DomainDetail": {
        "allOf": [
            _ref("Domain"),
            {
                "type": "object",
                "properties": {
                    "outages": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "started_at": {"type": "string"},
                                "ended_at": {"type": "string", "nullable": True},
                            },
                        },
                    }
                },
            },
        ]
    },
    "Series": {
        "type": "object",
        "properties": {
            "domain": {"type": "string"},
            "interval_seconds": {"type": "integer"},
            "points": {"type": "array", "items": _OBJ},
        },
    },
    "Status": {
        "type": "object",
        "properties": {
            "node": {"type": "string"},
            "spool": _OBJ,
            "disk_free_bytes": {"type": "integer"},
            "smtp_sessions_open": {"type": "integer", "nullable": True},
            "outages_declared": {"type": "array", "items": {"type": "string"}},
            "domains": {"type": "array", "items": _ref("Domain")},
            "alerts": {"type": "array", "items": _OBJ},
        },
    },
    "Recipient": {
        "type": "object",
        "properties": {
            "address": {"type": "string"},
            "domain": {"type": "string"},
            "state": {"type": "string", "enum": [s.value for s in RecipientState]},
            "attempts": {"type": "integer"},
            "next_attempt_at": {"type": "string", "nullable": True},
            "last_attempt_at": {"type": "string", "nullable": True},
            "last_reply": {"type": "string", "nullable": True},
            "held_reason": {"type": "string", "nullable": True},
            "held_since": {"type": "string", "nullable": True},
        },
    },
    "Message": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "size": {"type": "integer"},
            "received_at": {"type": "string"},
            "sender": {"type": "string"},
            "kind": {"type": "string"},
            "client_ip": {"type": "string"},
            "recipients": {"type": "array", "items": _ref("Recipient")},
        },
    },
    "MessageDetail": {
        "allOf": [
            _ref("Message"),
            {
                "type": "object",
                "properties": {
                    "envelope": _OBJ,
                    "headers": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
                    "history": {"type": "array", "items": _OBJ},
                },
            },
        ]
    },
    "QueuePage": {
        "type": "object",
        "properties": {
            "messages": {"type": "array", "items": _ref("Message")},
            "count": {"type": "integer"},
            "next": {"type": "string", "nullable": True},
        },
    },
    "GuardHolds": {"type": "object", "properties": {"holds": {"type": "array", "items": _OBJ}}},
    "Release": {
        "type": "object",
        "properties": {
            "reason": {
                "type": "string",
                "enum": ["operator", "recovery-guard"],
                "description": "only holds of this reason",
            }
        },
    },
    "Reroute": {
        "type": "object",
        "required": ["hosts"],
        "properties": {
            "hosts": {"type": "array", "items": {"type": "string"}, "example": ["10.0.0.7:25"]},
            "release_held": {"type": "boolean", "description": "also release held mail (default false)"},
        },
    },
    "RerouteResult": {
        "type": "object",
        "properties": {
            "domain": {"type": "string"},
            "reroute": {"type": "array", "items": {"type": "string"}, "nullable": True},
            "flushed": {"type": "integer"},
            "released": {"type": "integer"},
            "was_rerouted": {"type": "boolean"},
        },
    },
    "Alerts": {"type": "object", "properties": {"alerts": {"type": "array", "items": _OBJ}}},
    "Body": {"type": "string", "format": "binary"},
    "OpenAPI": _OBJ,
}


def openapi_spec() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for e in ENDPOINTS:
        path = e.path.replace(QUEUE_ID, "{id}")
        content_type = "message/rfc822" if e.response == "Body" else "application/json"
        op: dict[str, Any] = {
            "summary": e.summary,
            "operationId": e.handler,
            "tags": [e.tag],
            "parameters": [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.where == "path",
                    "description": p.description,
                    "schema": {"type": p.schema},
                }
                for p in e.params
            ],
            "responses": {
                "200": {"description": "OK", "content": {content_type: {"schema": _ref(e.response)}}},
                "404": {
                    "description": "no such domain or message",
                    "content": {"application/json": {"schema": _ref("Error")}},
                },
            },
        }
        if e.auth:
            op["responses"]["401"] = {
                "description": "missing or wrong token",
                "content": {"application/json": {"schema": _ref("Error")}},
            }
        else:
            op["security"] = []
        if e.body:
            op["requestBody"] = {
                "required": e.body == "Reroute",
                "content": {"application/json": {"schema": _ref(e.body)}},
            }
        if e.method != "GET":
            op["responses"]["400"] = {
                "description": "bad input",
                "content": {"application/json": {"schema": _ref("Error")}},
            }
        paths.setdefault(path, {})[e.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "backupmx admin API",
            "version": __version__,
            "description": "Queue, domains and actions of one backupmx node. Authenticate with "
            "`Authorization: Bearer TOKEN` (the token in [admin] token_file).",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": _SCHEMAS},
        "paths": paths,
    }
