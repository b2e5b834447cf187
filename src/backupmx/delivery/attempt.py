"""One delivery attempt: the route to a destination (the operator's reroute first), a new session to
it, and one transaction for one job (body read from the spool, handed to relay.py).

Returns values, never raises for what a peer or the DNS does: a destination that cannot be reached is
an `Unreachable` carrying the outcome every waiting job gets; a body that cannot be read ends the
transaction before the final dot, as a deferral (relay.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from backupmx.config import Config
from backupmx.delivery.relay import (
    BODY_CHUNK,
    ConnectFailed,
    LeaseCheck,
    RelaySession,
    RelaySettings,
    StoredBody,
    TransactionResult,
)
from backupmx.delivery.route import Route, RouteResolver, RouteSource, Target
from backupmx.delivery.work import Destination, Job
from backupmx.errors import RouteError
from backupmx.model import Bounced, Deferred, Delivered
from backupmx.reply import Reply
from backupmx.spool import Spool

log = logging.getLogger("backupmx.delivery")

try:  # the spool's fault-injection hook, for kill tests
    from backupmx.spool.faults import fault_point
except ImportError:  # pragma: no cover - the module ships with the spool

    def fault_point(name: str) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Unreachable:
    """No session to the destination: every job waiting for it gets `outcome`."""

    outcome: Deferred | Bounced
    relay: str | None  # host:port last tried, when a connection was tried
    connect_error: str | None  # set when connecting failed (the health monitor hears of it)


class Attempts:
    def __init__(
        self, config: Config, spool: Spool, resolver: RouteResolver, reroutes: Mapping[str, tuple[Target, ...]]
    ) -> None:
        self._config = config
        self._spool = spool
        self._resolver = resolver
        self._reroutes = reroutes  # the engine's live map: a reroute applies from the next connection

    async def route(self, domain: str) -> Route:
        reroute = self._reroutes.get(domain)
        if reroute is not None:
            return Route(domain, reroute, RouteSource.REROUTE)
        return await self._resolver.resolve(domain)

    async def connect(self, dest: Destination) -> RelaySession | Unreachable:
        try:
            route = await self.route(dest.domain)
        except RouteError as e:
            return Unreachable(Deferred(Reply(451, "4.4.3", str(e))), None, None)
        if route.failure is not None:
            return Unreachable(Bounced(route.failure), None, None)
        settings = RelaySettings.from_config(self._config, dest.domain)
        try:
            return await RelaySession.open(route.targets, settings)
        except ConnectFailed as e:
            return Unreachable(Deferred(e.reply), e.target.label if e.target else None, e.reply.text)

    async def deliver(
        self, dest: Destination, session: RelaySession, job: Job, lease_check: LeaseCheck | None = None
    ) -> TransactionResult:
        """One transaction. `lease_check` is asked before MAIL FROM and before the final dot; when it
        says the lease is gone the result says `lease_lost` (nothing was delivered; record nothing)."""
        msg = job.claim.message
        # streamed from the spool while it is sent (bounded memory); an unreadable body ends the
        # transaction without the final dot, as a deferral
        body = StoredBody(msg.size, lambda: self._spool.iter_body(msg.id, BODY_CHUNK))
        dest.in_flight += 1
        try:
            # the lease keeper renews the lease meanwhile: the job stays in the window until recorded
            result = await session.deliver(msg.envelope, job.claim.recipients, body, lease_check=lease_check)
        finally:
            dest.in_flight -= 1
        if any(isinstance(o, Delivered) for o in result.outcomes):
            fault_point("delivery.after_remote_250")
        return result
