"""Every Prometheus metric of backupmx, defined here and nowhere else.

A custom Collector reads immutable snapshots at scrape time: `render()` first takes one
`NodeSnapshot` (spool stats, health, delivery and SMTP statistics, disk), then the collector turns it and
the mail event counters into metric families. Names are `backupmx_<noun>_<unit>`; labels are enums
(state, event, reason) and configured domain names only, never addresses or IPs.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backupmx import __version__
from backupmx.admin.mailevents import MailTally
from backupmx.admin.operations import NodeSnapshot, Operations
from backupmx.logfailures import FAILURES
from backupmx.model import RecipientState
from backupmx.monitor import DestinationState
from backupmx.policy.ldap import SyncState, read_state

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name -> help; the operator's guide lists the same table
METRICS: dict[str, str] = {
    "backupmx_queue_recipients": "Recipients in the spool by protected domain and state (queued, held).",
    "backupmx_queue_messages": "Messages with a recipient not yet delivered, bounced or expired, by domain.",
    "backupmx_oldest_message_age_seconds": "Age of the oldest pending message, by domain.",
    "backupmx_mail_events_total": "User-mail events since start by event, domain and reason class.",
    "backupmx_own_mail_events_total": "Events of our own mail (DSNs, canaries) since start by kind, event and reason.",
    "backupmx_primary_up": "1 when the domain's primary answers (up or recovering), else 0.",
    "backupmx_primary_state": "1 for the current state of the domain's primary.",
    "backupmx_outage_declared": "1 while an outage of the domain's primary is declared.",
    "backupmx_outage_duration_seconds": "Time since the declared outage began (0 when none).",
    "backupmx_reroute_active": "1 while the domain's mail is rerouted to other hosts.",
    "backupmx_delivery_concurrency": "Delivery concurrency per destination (slow start).",
    "backupmx_spool_size_bytes": "Size of the spool on disk.",
    "backupmx_disk_free_bytes": "Free space on the data directory's filesystem.",
    "backupmx_smtp_open_sessions": "SMTP sessions open now.",
    "backupmx_corrupt_messages": "Spool entries set aside as damaged.",
    "backupmx_held_recipients": "Recipients HELD by domain and reason (operator, recovery-guard, poison, drill).",
    "backupmx_build_info": "Always 1; the version label says which backupmx runs.",
    "backupmx_ldap_recipients": 'Addresses in use from the directory, by LDAP domain (recipients = "ldap://...").',
    "backupmx_ldap_last_sync_timestamp_seconds": "When the LDAP domain's last successful sync ended (0: never).",
    "backupmx_ldap_sync_ok": "1 when the LDAP domain's last sync attempt succeeded, else 0 (the last set is kept).",
    "backupmx_log_write_errors_total": "Lines the mail log, continuity audit or alert state could not write, by log.",
}


def _gauge(name: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, METRICS[name], labels=labels)


class SnapshotCollector(Collector):
    """Turns the snapshot taken for this scrape and the event counters into metric families."""

    def __init__(self, tally: MailTally) -> None:
        self.tally = tally
        self.snapshot: NodeSnapshot | None = None
        self.ldap: list[SyncState] = []  # recipients = "ldap://..." domains, read from the spool's kv

    def collect(self) -> Iterator[Metric]:
        info = _gauge("backupmx_build_info", ["version"])
        info.add_metric([__version__], 1)
        yield info
        events = CounterMetricFamily(
            "backupmx_mail_events", METRICS["backupmx_mail_events_total"], labels=["event", "domain", "reason"]
        )
        for (event, domain, reason), n in sorted(self.tally.counts().items()):
            events.add_metric([event.value, domain, reason.value], n)
        yield events
        own = CounterMetricFamily(
            "backupmx_own_mail_events", METRICS["backupmx_own_mail_events_total"], labels=["kind", "event", "reason"]
        )
        for (kind, event, reason), n in sorted(self.tally.own_counts().items()):
            own.add_metric([kind.value, event.value, reason.value], n)
        yield own
        lost = CounterMetricFamily(
            "backupmx_log_write_errors", METRICS["backupmx_log_write_errors_total"], labels=["log"]
        )
        for name, n in FAILURES.counts().items():
            lost.add_metric([name.value], n)
        yield lost
        snap = self.snapshot
        if snap is None:
            return
        yield from self._spool(snap)
        yield from self._primaries(snap)
        yield from self._node(snap)
        for st in self.ldap:
            yield from self._ldap(st)

    def _ldap(self, st: SyncState) -> Iterator[Metric]:
        count = _gauge("backupmx_ldap_recipients", ["domain"])
        count.add_metric([st.domain], st.count)
        synced = _gauge("backupmx_ldap_last_sync_timestamp_seconds", ["domain"])
        synced.add_metric([st.domain], st.synced_at or 0.0)
        ok = _gauge("backupmx_ldap_sync_ok", ["domain"])
        ok.add_metric([st.domain], 0 if st.error or st.synced_at is None else 1)
        yield from (count, synced, ok)

    def _spool(self, snap: NodeSnapshot) -> Iterator[Metric]:
        rcpts = _gauge("backupmx_queue_recipients", ["domain", "state"])
        msgs = _gauge("backupmx_queue_messages", ["domain"])
        oldest = _gauge("backupmx_oldest_message_age_seconds", ["domain"])
        for d in snap.domains:
            rcpts.add_metric([d.domain, RecipientState.QUEUED.value], d.queued)
            rcpts.add_metric([d.domain, RecipientState.HELD.value], d.held)
            msgs.add_metric([d.domain], d.messages_pending)
            age = d.oldest_age(snap.at)
            oldest.add_metric([d.domain], age if age is not None else 0.0)
        yield rcpts
        yield msgs
        yield oldest
        held = _gauge("backupmx_held_recipients", ["domain", "reason"])
        protected = {d.domain for d in snap.domains}  # labels: configured domains only
        for ds in snap.stats.domains:
            if ds.domain not in protected:
                continue
            for reason, n in sorted(ds.held_by_reason.items()):
                held.add_metric([ds.domain, reason], n)
        yield held
        corrupt = _gauge("backupmx_corrupt_messages")
        corrupt.add_metric([], snap.stats.corrupt)
        yield corrupt

    def _primaries(self, snap: NodeSnapshot) -> Iterator[Metric]:
        up = _gauge("backupmx_primary_up", ["domain"])
        state = _gauge("backupmx_primary_state", ["domain", "state"])
        declared = _gauge("backupmx_outage_declared", ["domain"])
        duration = _gauge("backupmx_outage_duration_seconds", ["domain"])
        reroute = _gauge("backupmx_reroute_active", ["domain"])
        conc = _gauge("backupmx_delivery_concurrency", ["domain"])
        for d in snap.domains:
            p = d.primary
            up.add_metric([d.domain], 1 if p.state in (DestinationState.UP, DestinationState.RECOVERING) else 0)
            for s in DestinationState:
                state.add_metric([d.domain, s.value], 1 if p.state is s else 0)
            declared.add_metric([d.domain], 1 if p.outage_declared else 0)
            duration.add_metric([d.domain], 0.0 if p.outage_since is None else max(0.0, snap.at - p.outage_since))
            reroute.add_metric([d.domain], 1 if d.reroute else 0)
            conc.add_metric([d.domain], snap.concurrency.get(d.domain, 0))
        yield from (up, state, declared, duration, reroute, conc)

    def _node(self, snap: NodeSnapshot) -> Iterator[Metric]:
        size = _gauge("backupmx_spool_size_bytes")
        size.add_metric([], snap.stats.bytes_on_disk)
        yield size
        if snap.disk_free_bytes is not None:
            free = _gauge("backupmx_disk_free_bytes")
            free.add_metric([], snap.disk_free_bytes)
            yield free
        if snap.smtp_sessions_open is not None:
            sessions = _gauge("backupmx_smtp_open_sessions")
            sessions.add_metric([], snap.smtp_sessions_open)
            yield sessions


class Metrics:
    """The /metrics exposition: one snapshot per scrape, then the text format."""

    def __init__(self, ops: Operations, tally: MailTally) -> None:
        self.ops = ops
        self.collector = SnapshotCollector(tally)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    async def render(self) -> bytes:
        self.collector.snapshot = await self.ops.snapshot(guard=False)  # no scan of held mail per scrape
        self.collector.ldap = [
            await read_state(self.ops.spool, d.name) for d in self.ops.config.domains if d.ldap_url is not None
        ]
        return bytes(generate_latest(self.registry))
