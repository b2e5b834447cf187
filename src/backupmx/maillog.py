"""The mail log: one line per event of a message's life (connect, reject, received, queued, deferred,
delivered, bounced, expired, held, released, deleted), carrying the queue ID so an operator can grep one
message's whole story. Text in the habit of Postfix's log lines by default, JSON lines as an option.
Never message bodies or credentials. Separate from the diagnostic log (the `logging` module)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from backupmx.privatefiles import open_private_append

Listener = Callable[[str, dict[str, object]], None]


class MailLog:
    def __init__(self, stream: TextIO | None = None, *, fmt: str = "text", node: str = "") -> None:
        self._stream = stream or sys.stderr
        self._fmt = fmt
        self._node = node
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    @classmethod
    def to_path(cls, path: Path | None, *, fmt: str = "text", node: str = "") -> MailLog:
        # created 0600 (addresses inside); an existing file keeps the mode its operator gave it
        stream = open(open_private_append(path), "a", encoding="utf-8", buffering=1) if path else sys.stderr  # noqa: SIM115
        return cls(stream, fmt=fmt, node=node)

    def subscribe(self, listener: Listener) -> None:
        """Metrics and alerts hear every event (called in the logging thread; keep it cheap)."""
        self._listeners.append(listener)

    def event(self, event: str, queue_id: str | None = None, **fields: object) -> None:
        fields = {k: v for k, v in fields.items() if v is not None}
        if queue_id:
            fields = {"queue_id": queue_id, **fields}
        for listener in self._listeners:
            try:
                listener(event, fields)
            except Exception:  # a broken listener must not stop mail
                pass
        now = time.time()
        if self._fmt == "json":
            line = json.dumps({"ts": round(now, 3), "node": self._node, "event": event, **fields},
                              default=str, ensure_ascii=False)
        else:
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
            qid = f"{fields.pop('queue_id')}: " if "queue_id" in fields else ""
            parts = ", ".join(f"{k}={_fmt_value(v)}" for k, v in fields.items())
            line = f"{ts} {self._node} backupmx/{event}: {qid}{parts}".rstrip(": ")
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def _fmt_value(v: object) -> str:
    s = str(v)
    if s == "" or (any(c in s for c in " ,=<>\"") and not (s.startswith("<") and s.endswith(">"))):
        return json.dumps(s, ensure_ascii=False)
    return s


NULL = MailLog(open("/dev/null", "w"))  # noqa: SIM115 (module-lifetime sink for tests)
