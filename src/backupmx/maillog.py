"""The mail log: one line per event of a message's life (connect, reject, received, queued, deferred,
delivered, bounced, expired, held, released, deleted), carrying the queue ID so an operator can grep one
message's whole story. Text in the habit of Postfix's log lines by default, JSON lines as an option.
Never message bodies or credentials. Separate from the diagnostic log (the `logging` module).
Best-effort: `event()` never raises; a line that cannot be written (ENOSPC, EPIPE, ...) is counted and
reported (backupmx.logfailures) and mail goes on. Values are escaped so that no field can forge another."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from backupmx.logfailures import FAILURES, LogName, WriteFailures
from backupmx.privatefiles import open_private_append

Listener = Callable[[str, dict[str, object]], None]

REOPEN_EVERY = 5.0  # seconds between two attempts to open a mail log file that could not be opened
# a bare value is printable ASCII that reads the same whatever surrounds it: no quote, escape, separator
# or bracket; one character outside that set makes it quoted
_NOT_BARE = re.compile(r'[^\x21-\x7e]|["\\,=<>]')


class AddressList(str):
    """Addresses as one field: `<a>,<b>` for listeners that read the text, and each address on its own for
    the text format, which must quote a hostile one without making the list ambiguous."""

    addresses: tuple[str, ...]

    def __new__(cls, addresses: Iterable[str]) -> AddressList:
        items = tuple(addresses)
        self = super().__new__(cls, ",".join(f"<{a}>" for a in items))
        self.addresses = items
        return self


class _Sink:
    def write(self, data: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _StreamSink(_Sink):
    """A text stream (stderr, or what a test hands in)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, data: str) -> None:
        self.stream.write(data)
        self.stream.flush()


class _FileSink(_Sink):
    """`log.maillog`: O_APPEND writes of whole lines straight to the fd (no Python buffer that keeps a
    failed line and repeats or tears it later). A line cut short by a full disk is ended before the next
    one, so one bad line never merges with a good one. A file that cannot be opened is tried again later."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._torn = False
        self._tried = float("-inf")
        self.open_error: OSError | None = None
        try:
            self._open()
        except OSError as e:  # a full disk at start: the first lines are lost, later ones try again
            self.open_error = e

    def _open(self) -> None:
        self._tried = time.monotonic()
        # created 0600 (addresses inside); an existing file keeps the mode its operator gave it
        self._fd = open_private_append(self.path)

    def write(self, data: str) -> None:
        if self._fd is None:
            if time.monotonic() - self._tried < REOPEN_EVERY:
                raise OSError(f"{self.path} is not open")
            self._open()
        assert self._fd is not None
        raw = ("\n" + data if self._torn else data).encode("utf-8")
        done = 0
        while done < len(raw):
            try:
                done += os.write(self._fd, raw[done:] if done else raw)
            except OSError:
                if done:  # part of this line is in the file: end it before the next one
                    self._torn = True
                raise  # nothing written: a line torn before stays torn
        self._torn = False

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                FAILURES.failed(LogName.MAILLOG, OSError("close failed"), self.path)


class MailLog:
    def __init__(
        self, stream: TextIO | None = None, *, fmt: str = "text", node: str = "", failures: WriteFailures = FAILURES
    ) -> None:
        self._sink: _Sink = _StreamSink(stream or sys.stderr)
        self._where = "stderr" if stream is None else "stream"
        self._fmt = fmt
        self._node = node
        self._failures = failures
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    @classmethod
    def to_path(cls, path: Path | None, *, fmt: str = "text", node: str = "") -> MailLog:
        log = cls(None, fmt=fmt, node=node)
        if path is not None:
            log._where = str(path)
            sink = _FileSink(path)
            log._sink = sink
            if sink.open_error is not None:
                log._failures.failed(LogName.MAILLOG, sink.open_error, path)
        return log

    def subscribe(self, listener: Listener) -> None:
        """Metrics and alerts hear every event (called in the logging thread; keep it cheap)."""
        self._listeners.append(listener)

    def event(self, event: str, queue_id: str | None = None, **fields: object) -> None:
        """Never raises: listeners and the write are best-effort."""
        fields = {k: v for k, v in fields.items() if v is not None}
        if queue_id:
            fields = {"queue_id": queue_id, **fields}
        for listener in self._listeners:
            try:
                listener(event, fields)
            except Exception:  # a broken listener must not stop mail
                pass
        try:
            line = self.format(event, fields, time.time())
            with self._lock:
                self._sink.write(line + "\n")
        except Exception as e:  # ENOSPC, EPIPE, a closed stream: counted and reported, mail goes on
            self._failures.failed(LogName.MAILLOG, e, self._where)
        else:
            self._failures.succeeded(LogName.MAILLOG, self._where)

    def format(self, event: str, fields: dict[str, object], now: float) -> str:
        if self._fmt == "json":
            doc = {"ts": round(now, 3), "node": self._node, "event": event, **fields}
            return _escape_unsafe(json.dumps(doc, default=str, ensure_ascii=False))
        return format_text(now, self._node, event, fields)

    def close(self) -> None:
        """Release the file (a clean stop); later events still work on a stream."""
        with self._lock:
            self._sink.close()


# -- the text format ---------------------------------------------------------------------------------
def format_text(now: float, node: str, event: str, fields: dict[str, object]) -> str:
    """`TS NODE backupmx/EVENT: [QUEUE_ID: ]k=v, k=v`. A value is written bare when it is printable ASCII
    without `"\\,=<>` and space; else as a JSON string with every control, format and line-separator
    character escaped (\\r, \\u001b, \\u2028 ...). `<...>` keeps its brackets around the bare or quoted
    address; an AddressList is `<a>,<b>` with each address so written. Read back by splitting on `, `
    only outside quotes: no value can add, end or fake a field."""
    ts = _second(int(now)) + f".{int(now % 1 * 1000):03d}Z"
    fields = dict(fields)
    head = f"{ts} {_value(node)} backupmx/{_value(event)}:"
    if "queue_id" in fields:
        qid = str(fields.pop("queue_id"))
        head += f" {qid if qid.isalnum() and qid.isascii() else _quote(qid)}:"  # a bare one has no ":"
    parts = ", ".join(f"{_key(k)}={_value(v)}" for k, v in fields.items())
    return f"{head} {parts}" if parts else head


def _bare(s: str) -> bool:
    return bool(s) and _NOT_BARE.search(s) is None


@functools.lru_cache(maxsize=4)
def _second(at: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at))


def _key(k: str) -> str:
    return k if _bare(k) else _quote(k)


def _value(v: object) -> str:
    if isinstance(v, AddressList):
        return ",".join(_angle(a) for a in v.addresses) or '""'
    s = str(v)
    if len(s) >= 2 and s[0] == "<" and s[-1] == ">":
        return _angle(s[1:-1])
    return s if _bare(s) else _quote(s)


def _angle(inner: str) -> str:
    return f"<{inner}>" if not inner or _NOT_BARE.search(inner) is None else f"<{_quote(inner)}>"


def _quote(s: str) -> str:
    return _escape_unsafe(json.dumps(s, ensure_ascii=False))


def _escape_unsafe(text: str) -> str:
    """JSON already escapes C0 controls; also every other character Python does not call printable: DEL,
    C1 controls (\x9b is a terminal's CSI), format characters (bidi overrides), surrogates, unassigned
    code points, the Unicode line/paragraph separators and spaces other than " " (NBSP looks like one),
    as \\uXXXX, which JSON readers decode back."""
    if text.isprintable():
        return text
    out: list[str] = []
    for c in text:
        if c.isprintable():
            out.append(c)
            continue
        code = ord(c)
        if code > 0xFFFF:  # as a JSON surrogate pair
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


NULL = MailLog(open("/dev/null", "w"))  # noqa: SIM115 (module-lifetime sink for tests)
