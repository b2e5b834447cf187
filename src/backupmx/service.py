"""The composition root: reads nothing but the Config it is given, builds every part (spool, policy
checks, SMTP server, health monitor, delivery engine, admin listener), runs them, and stops them in
order on SIGTERM/SIGINT so that nothing accepted is lost. Only this module wires objects together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from collections.abc import Coroutine
from typing import Any

from backupmx import sdnotify
from backupmx.clock import Clock, SystemClock
from backupmx.config import Config, require_domains
from backupmx.maillog import MailLog
from backupmx.spool import Spool
from backupmx.spool.backends import open_spool

log = logging.getLogger("backupmx")

STOP_GRACE_SECONDS = 30.0


async def _named(what: str, address: str, start: Coroutine[Any, Any, None]) -> None:
    """Await a listener's start; an OSError names the listener and its address (the cause stays chained)."""
    try:
        await start
    except OSError as e:
        raise OSError(e.errno, f"{what} {address}: {e.strerror or e}") from e


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    if cfg.server.tls_cert is None or cfg.server.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.server.tls_cert), str(cfg.server.tls_key))
    return ctx


class Service:
    """Every running part of one backupmx node."""

    def __init__(self, cfg: Config, *, clock: Clock | None = None, maillog: MailLog | None = None) -> None:
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
        self.maillog = maillog or MailLog.to_path(cfg.log.maillog, fmt=cfg.log.format, node=cfg.server.node)
        self.spool: Spool | None = None
        self.smtp: Any = None
        self.health: Any = None
        self.engine: Any = None
        self.admin: Any = None
        self.resolver: Any = None
        self.canary: Any = None  # [[canary]] (monitor/canary.py)
        self.drills: Any = None  # `backupmx drill` requests (monitor/drill.py)
        self.checks: list[Any] = []
        self.stamps: list[Any] = []  # header fields above our Received: SPF's Authentication-Results
        self.verifier: Any = None  # recipients = "verify" (policy/verify.py)
        self.ldap: Any = None  # recipients = "ldap://..." (policy/ldap.py)
        self.continuity: Any = None  # [continuity]: the emergency inbox's own listener
        self.alerts: Any = None  # [[alerts]] (monitor/alerts.py)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A long-running part; if it dies, the failure is logged (the SMTP side keeps accepting)."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._part_done)
        self._tasks.append(task)

    @staticmethod
    def _part_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s stopped: %r", task.get_name(), task.exception())

    async def start(self) -> None:
        from backupmx.delivery.route import RouteResolver
        from backupmx.delivery.scheduler import DeliveryEngine
        from backupmx.monitor.probe import HealthMonitor
        from backupmx.policy.domains import build_checks
        from backupmx.privatefiles import refuse_unsafe
        from backupmx.smtp.server import SmtpServer

        cfg = self.cfg
        refuse_unsafe(cfg)  # ConfigError (exit 2) before anything is bound or opened
        self.spool = await open_spool(cfg, clock=self.clock)
        self.resolver = RouteResolver(cfg)
        self.health = HealthMonitor(cfg, self.spool, self.clock, self.maillog, self.resolver)
        self.engine = DeliveryEngine(cfg, self.spool, self.clock, self.maillog, self.health, self.resolver)
        self.checks = build_checks(cfg) + self._edge_checks()
        await self._start_ldap()
        await self._start_mirror()
        self.stamps = self._edge_stamps()
        self.smtp = SmtpServer(
            config=cfg,
            spool=self.spool,
            checks=self.checks,
            maillog=self.maillog,
            clock=self.clock,
            tls_context=tls_context(cfg),
            stamps=self.stamps,
        )
        self.smtp.on_queued = lambda _qid, _domains: self.engine.wake()
        self.smtp.content_filter = self._content_filter()
        if cfg.canary:
            from backupmx.monitor.canary import Canary

            self.canary = Canary(cfg, self.spool, self.health, self.maillog, self.clock, self.smtp)
            self.smtp.classify = self.canary.classify  # the listener stores our own canaries as kind canary
        if cfg.alerts:
            from backupmx.monitor.alerts import AlertManager

            self.alerts = AlertManager(
                cfg.alerts,
                config=cfg,
                spool=self.spool,
                health=self.health,
                clock=self.clock,
                maillog=self.maillog,
                canary=self.canary,
            )
            self.health.subscribe(self.alerts.on_health_change)
        await self.health.open()  # an outage declared before a restart is still declared
        # Bind every listener first, then serve. SMTP is bound but accepts nothing until all are bound
        # (the kernel refuses its clients meanwhile), so a start that fails gave no client a 220 or a
        # 250; the web listeners serve once bound, and they take in nothing a failed start could lose.
        await self.smtp.bind()
        if cfg.admin.listen:
            await _named("admin listener", cfg.admin.listen, self._start_admin())
        if cfg.continuity.enabled:
            await _named(
                "continuity listener", "{}:{}".format(*cfg.continuity.listen_address), self._start_continuity()
            )
        # every listener is bound: serve
        self._spawn(self.health.run(), "health monitor")
        self._spawn(self.engine.run(), "delivery engine")
        self._spawn(self._purge_loop(), "purge")
        if self.alerts is not None:
            await self.alerts.start()
        await self.smtp.serve()
        await self._start_proofs()
        addrs = " ".join(f"{h}:{p}" for h, p in self.smtp.bound)
        admin = f" admin={self.admin.bound[0]}:{self.admin.bound[1]}" if self.admin else ""
        log.info(
            "ready: smtp=%s%s node=%s domains=%s", addrs, admin, cfg.server.node, ",".join(d.name for d in cfg.domains)
        )

    async def _purge_loop(self) -> None:
        """Deletes finished messages older than spool.keep_finished, in bounded batches."""
        keep = self.cfg.spool.keep_finished.total_seconds()
        every = self.cfg.spool.purge_interval.total_seconds()
        assert self.spool is not None
        while not self._stopping.is_set():
            try:
                while await self.spool.purge(before=self.clock.now() - keep, limit=10_000) == 10_000:
                    await asyncio.sleep(0)
            except Exception:  # a purge that fails now is tried again later; it never stops mail
                log.exception("purging finished messages failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=every)

    def _edge_checks(self) -> list[Any]:
        """After relay control and recipient lists: DNSBL (connect), message rate (MAIL), the
        when_primary_down gate and recipient verification (RCPT). See docs/edge.md."""
        from backupmx.policy.dnsbl import DnsblCheck
        from backupmx.policy.learned import LearnedRecipients
        from backupmx.policy.ratelimit import MessageRateLimit
        from backupmx.policy.verify import PrimaryGate, RecipientVerifier, SmtpRcptProber, VerifyCheck

        cfg = self.cfg
        from backupmx.policy.spf import SpfRejectCheck

        checks: list[Any] = [
            c
            for c in (DnsblCheck.from_config(cfg), MessageRateLimit.from_config(cfg), SpfRejectCheck.from_config(cfg))
            if c
        ]
        gate = PrimaryGate(cfg.domains, self.health)
        if gate.active:
            checks.append(gate)
        if any(d.recipients == "verify" for d in cfg.domains):
            assert self.spool is not None
            store = LearnedRecipients(self.spool, keep=cfg.delivery.retention_cap.total_seconds())
            self.verifier = RecipientVerifier(
                cfg.domains,
                store,
                SmtpRcptProber.from_config(cfg, self.resolver),
                self.health,
                self.clock,
                maillog=self.maillog,
                probe_wait=2 * cfg.delivery.probe_timeout.total_seconds() + 1,
            )
            self.maillog.subscribe(self.verifier.on_maillog)  # deliveries teach known addresses
            self._spawn(self.verifier.run(), "recipient learning")
            checks.append(VerifyCheck(cfg.domains, self.verifier))
        return checks

    async def _start_mirror(self) -> None:
        """The primaries' last EHLO, mirrored at RCPT/MAIL (policy/mirror.py); fed by the health probe."""
        from backupmx.policy.mirror import MirrorCheck, PrimaryOffers

        assert self.spool is not None and self.health is not None
        offers = PrimaryOffers(self.cfg.domain_names, self.spool)
        await offers.load()
        self.health.on_ehlo = offers.seen
        self.checks.append(MirrorCheck(offers))

    async def _start_ldap(self) -> None:
        """recipients = "ldap://...": the synced sets replace those domains' directories (policy/ldap.py)."""
        from backupmx.policy.ldap import LdapSync
        from backupmx.policy.recipients import RecipientCheck

        if not any(d.ldap_url for d in self.cfg.domains):
            return
        assert self.spool is not None
        self.ldap = LdapSync(self.cfg.domains, self.spool)
        for check in self.checks:
            if isinstance(check, RecipientCheck):
                for name, directory in self.ldap.directories.items():
                    check.set_directory(name, directory)
        await self.ldap.load()  # the last synced sets, before the listener takes its first RCPT
        self._spawn(self.ldap.run(), "ldap recipients")

    def _content_filter(self) -> Any:
        """At the final dot, in order: DKIM/DMARC (filter/auth.py), then rspamd (filter/rspamd.py)."""
        from backupmx.filter import FilterChain
        from backupmx.filter.auth import AuthFilter
        from backupmx.filter.rspamd import RspamdFilter

        filters = [f for f in (AuthFilter.from_config(self.cfg), RspamdFilter.from_config(self.cfg)) if f]
        return FilterChain(filters) if filters else None

    def _edge_stamps(self) -> list[Any]:
        from backupmx.policy.spf import SpfStamp

        stamp = SpfStamp.from_config(self.cfg)
        return [stamp] if stamp is not None else []

    async def _start_admin(self) -> None:
        from backupmx.admin.api import AdminServer

        assert self.spool is not None
        self.admin = AdminServer(
            self.cfg, self.spool, self.health, self.engine, self.smtp, self.maillog, self.clock, alerts=self.alerts
        )
        await self.admin.start()

    async def _start_continuity(self) -> None:
        from backupmx.continuity.inbox import ContinuityServer

        assert self.spool is not None
        self.continuity = ContinuityServer(self.cfg, self.spool, self.health, self.clock)
        await self.continuity.start()

    async def _start_proofs(self) -> None:
        """The drill runner (always) and the canary (with [[canary]]), once the listener is bound."""
        from backupmx.monitor.drill import DrillRunner

        assert self.spool is not None
        self.drills = DrillRunner(self.cfg, self.spool, self.health, self.maillog, self.clock)
        self._spawn(self.drills.run(), "drills")
        if self.canary is not None:
            await self.canary.open()
            if self.admin is not None:
                self.admin.metrics.registry.register(self.canary.collector())
            self._spawn(self.canary.run(), "canary")

    def reload(self) -> None:
        """SIGHUP: re-read recipient files and the TLS certificate; the rest needs a restart."""
        for chk in self.checks:
            reload = getattr(chk, "reload", None)
            if callable(reload):
                reload()
        if self.smtp is not None:
            try:
                self.smtp.set_tls_context(tls_context(self.cfg))
            except (OSError, ssl.SSLError) as e:
                log.error("reload: TLS certificate not reloaded: %s", e)
        log.info("reloaded recipient lists and TLS certificate")

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop accepting (421), finish what is in flight, give back leases, close the spool."""
        self._stopping.set()
        for proof in (self.canary, self.drills):  # a running drill releases its domain first
            if proof is not None:
                proof.stop()
        if self.smtp is not None:
            await self.smtp.stop(grace=grace)
        if self.admin is not None:
            await self.admin.stop()
        if self.alerts is not None:
            await self.alerts.stop()
        if self.continuity is not None:
            await self.continuity.stop()
        if self.engine is not None:
            await self.engine.stop()
        if self.health is not None:
            self.health.stop()
        if self.verifier is not None:
            self.verifier.stop()  # writes what the last deliveries taught, then ends
        if self.ldap is not None:
            self.ldap.stop()
        for stamp in self.stamps:
            stamp.close()
        if self.smtp is not None and self.smtp.content_filter is not None:
            await self.smtp.content_filter.close()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:  # a delivery still running past the grace: its lease expires, no loss
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.spool is not None:
            await self.spool.close()
        self.maillog.close()
        log.info("stopped")


async def serve(cfg: Config) -> int:
    service = Service(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload)
    try:
        await service.start()
    except OSError as e:
        log.error("cannot start: %s", e)
        with contextlib.suppress(Exception):
            await service.stop(grace=0)
        return 1
    async with sdnotify.running(f"serving {', '.join(d.name for d in cfg.domains)}"):  # READY=1: all bound
        await stop.wait()
    log.info("stopping: new connections get 421, transactions in flight finish")
    await service.stop()
    return 0


def setup_logging(cfg: Config) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=cfg.log.level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_service(cfg: Config) -> int:
    require_domains(cfg)
    setup_logging(cfg)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        return runner.run(serve(cfg))
