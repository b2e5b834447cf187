"""No poison message: a message whose processing raised an unexpected error `delivery.poison_after` times
in a row is set aside, HELD with reason "poison" (queue list shows it, /metrics counts it, an alert
fires), never retried endlessly and never dropped; `queue release` gives it another chance.

The count lives in the spool's shared state (kv namespace "poison", one key per message, expiring a
week after the last failure): it survives a restart (a message that kills the process counts, too) and
every node of a shared spool adds to the same count. A recorded outcome clears it. A failure to count
is logged; the lease then runs out and the message comes back, to be counted next time.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from backupmx.clock import Clock
from backupmx.maillog import MailLog
from backupmx.model import QueueId
from backupmx.spool import Claim, Spool

log = logging.getLogger("backupmx.delivery")

NAMESPACE = "poison"
REASON = "poison"  # the held_reason of a message set aside
COUNT_TTL = 7 * 86400.0  # a count not added to for this long is forgotten
SUSPECTS_MAX = 10_000  # messages this process saw fail, to clear their count on success (bounded)


class PoisonGuard:
    def __init__(self, spool: Spool, clock: Clock, maillog: MailLog, *, limit: int) -> None:
        self._spool = spool
        self._clock = clock
        self._maillog = maillog
        self._limit = limit
        self._suspects: OrderedDict[str, None] = OrderedDict()
        self.set_aside = 0  # messages this process set aside (statistics)

    async def failed(self, message_id: QueueId, error: str, claim: Claim | None = None) -> bool:
        """Count one unexpected failure of `message_id`; True when it was set aside just now (then the
        lease of `claim` is given back, so a release by the operator is tried at once)."""
        key = str(message_id)
        now = self._clock.now()
        try:
            raw = await self._spool.kv_get(NAMESPACE, key)
            count = _count(raw) + 1
            if count >= self._limit:
                held = await self._spool.hold(message_id, reason=REASON, now=now)
                if claim is not None:
                    await self._spool.release([claim])
                await self._spool.kv_delete(NAMESPACE, key)
                self._suspects.pop(key, None)
                self.set_aside += 1
                log.error(
                    "%s: set aside as poison after %d failures in a row (%d recipients held); last: %s",
                    message_id,
                    count,
                    held,
                    error,
                )
                self._maillog.event("held", key, reason=REASON, failures=count, error=error[:200])
                return True
            await self._spool.kv_put(NAMESPACE, key, str(count).encode(), expires_at=now + COUNT_TTL, now=now)
        except Exception:
            log.exception(
                "%s: counting a failure toward the poison limit failed; it comes back with its lease", message_id
            )
            return False
        self._suspects[key] = None
        self._suspects.move_to_end(key)
        while len(self._suspects) > SUSPECTS_MAX:
            self._suspects.popitem(last=False)
        log.warning("%s: failure %d of %d before it is set aside as poison: %s", message_id, count, self._limit, error)
        return False

    async def succeeded(self, message_id: QueueId) -> None:
        """An outcome of `message_id` was recorded: the failures were not in a row."""
        key = str(message_id)
        if key not in self._suspects:
            return  # never failed here (a count another node holds expires on its own)
        del self._suspects[key]
        try:
            await self._spool.kv_delete(NAMESPACE, key)
        except Exception:
            log.warning("%s: clearing its poison count failed; it expires on its own", message_id)


def _count(raw: bytes | None) -> int:
    try:
        return max(0, int(raw or b"0"))
    except ValueError:
        return 0  # a damaged count starts again
