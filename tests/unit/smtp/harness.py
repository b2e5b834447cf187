"""A driver for the sans-IO SmtpConnection: feeds bytes, answers decisions like a permissive server
(or as told), collects the stored messages and the replies. No sockets, no event loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from backupmx.reply import Reply
from backupmx.smtp.protocol import (
    CLOSED,
    NEED_DATA,
    DataChunk,
    DataComplete,
    DataRejected,
    DataRequested,
    Event,
    Hello,
    MailFrom,
    ProtocolConfig,
    RcptTo,
    SmtpConnection,
    StartTls,
    Transaction,
)

BANNER = Reply(220, "", "mx.test ESMTP")


@dataclass
class Stored:
    transaction: Transaction
    body: bytes


@dataclass
class Harness:
    config: ProtocolConfig = field(default_factory=lambda: ProtocolConfig(hostname="mx.test"))
    rcpt_policy: Callable[[str], Reply | None] = lambda _addr: None  # a Reply refuses
    conn: SmtpConnection = field(init=False)
    events: list[Event] = field(default_factory=list)
    stored: list[Stored] = field(default_factory=list)
    rejected_data: list[Reply] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)  # every reply line, in order

    def __post_init__(self) -> None:
        self.conn = SmtpConnection(self.config)
        self.conn.greet(BANNER)
        self._collect()

    @classmethod
    def make(cls, **cfg: object) -> Harness:
        return cls(config=ProtocolConfig(hostname="mx.test", **cfg))  # type: ignore[arg-type]

    def _collect(self) -> list[str]:
        out = self.conn.data_to_send().decode("utf-8", "replace")
        lines = [ln for ln in out.split("\r\n") if ln]
        self.replies.extend(lines)
        return lines

    def feed(self, data: bytes) -> list[str]:
        """Feed bytes, run to NEED_DATA/CLOSED, return the final line of each reply sent."""
        self.conn.receive_data(data)
        self.pump()
        return [ln for ln in self._collect() if len(ln) < 4 or ln[3] != "-"]

    def pump(self) -> object:
        c = self.conn
        while True:
            ev = c.next_event()
            if ev is NEED_DATA or ev is CLOSED:
                return ev
            self.events.append(ev)  # type: ignore[arg-type]
            if isinstance(ev, (Hello, MailFrom, DataRequested)):
                c.accept()
            elif isinstance(ev, RcptTo):
                refusal = self.rcpt_policy(ev.recipient.address)
                if refusal is None:
                    c.accept()
                else:
                    c.refuse(refusal)
            elif isinstance(ev, DataChunk):
                self.chunks.append(ev.data)
            elif isinstance(ev, DataComplete):
                assert c.transaction is not None
                self.stored.append(Stored(c.transaction, b"".join(self.chunks)))
                self.chunks = []
                c.accept(Reply(250, "2.0.0", f"Ok: queued as Q{len(self.stored)}"))
            elif isinstance(ev, DataRejected):
                self.chunks = []
                self.rejected_data.append(ev.reply)
            elif isinstance(ev, StartTls):
                pass

    def ehlo(self) -> None:
        self.feed(b"EHLO client.test\r\n")

    def of(self, kind: type) -> list[object]:
        return [e for e in self.events if isinstance(e, kind)]
