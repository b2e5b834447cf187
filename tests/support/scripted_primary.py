"""A scripted SMTP "primary" on loopback: answers each command with whatever bytes the test gives it.

aiosmtpd cannot send 8-bit reply text, split a reply across packets or leave a reply unfinished; this
one can. Every transaction that reached the final dot is recorded (envelope and un-stuffed body) so a
test counts the copies a primary received. Runs in the test's event loop (`await start()`) or in a
thread of its own (`with ScriptedPrimary().running():`) for sync tests that drive a real `serve`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

DEFAULT_EXTENSIONS: tuple[str, ...] = ("PIPELINING", "8BITMIME", "SIZE 104857600")
LINE_LIMIT = 1_000_000  # a command line longer than this ends the session (tests only send short ones)


@dataclass(frozen=True)
class Answer:
    """What to send for one command: `parts` written one after another, `delay` seconds before each
    part; then `close` drops the connection, `hang` stops answering (a reply that never ends)."""

    parts: tuple[bytes, ...]
    delay: float = 0.0
    close: bool = False
    hang: bool = False

    @classmethod
    def of(cls, *parts: bytes | str, delay: float = 0.0, close: bool = False, hang: bool = False) -> Answer:
        raw = tuple(p.encode("utf-8") if isinstance(p, str) else p for p in parts)
        return cls(raw, delay, close, hang)


@dataclass(frozen=True)
class Command:
    """One command as received: `verb` upper-cased ("MAIL", "RCPT", "DOT" for the final dot), `arg`
    the raw bytes after the verb, and the transaction it belongs to."""

    verb: str
    arg: bytes
    transaction: Transaction


AnswerSpec = Answer | bytes | str | Callable[[Command], "Answer | bytes | str"]


@dataclass
class Transaction:
    """One MAIL ... transaction as this primary saw it."""

    mail: bytes = b""  # the MAIL FROM argument, raw
    rcpts: list[bytes] = field(default_factory=list)  # RCPT TO arguments that got a 2xx
    body: bytes | None = None  # un-dot-stuffed, None until the final dot arrived
    dot_reply: bytes = b""  # the first bytes answered to the final dot

    @property
    def sender(self) -> str:
        return _address(self.mail)

    @property
    def recipients(self) -> list[str]:
        return [_address(r) for r in self.rcpts]


def _address(arg: bytes) -> str:
    _, _, rest = arg.partition(b":")
    addr = rest.strip().split(b" ", 1)[0]
    return addr.strip(b"<>").decode("utf-8", "replace")


def _as_answer(spec: Answer | bytes | str) -> Answer:
    if isinstance(spec, Answer):
        return spec
    return Answer.of(spec)


class ScriptedPrimary:
    """The primary. Defaults answer like a plain ESMTP server; `script(verb, ...)` queues answers for
    the next commands of that verb, `default(verb, spec)` replaces the standing answer."""

    def __init__(
        self,
        *,
        extensions: Iterable[str] = DEFAULT_EXTENSIONS,
        hostname: str = "primary.test",
        banner: Answer | bytes | str | None = None,
        keep_bodies: bool = True,
        grouped: bool = False,
    ) -> None:
        self.extensions = list(extensions)
        # True: the replies to MAIL and RCPT are held and written with the reply to the next other
        # command (DATA) in one write, as Postfix answers a pipelined group (RFC 2920); a client that
        # waits for the reply to MAIL before sending on then waits forever
        self.grouped = grouped
        self.keep_bodies = keep_bodies  # False: a sink (bodies recorded as b"", their sizes in body_sizes)
        self.body_sizes: list[int] = []
        self.hostname = hostname
        self.banner = _as_answer(banner if banner is not None else f"220 {hostname} ESMTP scripted\r\n")
        self._defaults: dict[str, AnswerSpec] = {
            "EHLO": self._ehlo,
            "HELO": f"250 {hostname}\r\n",
            "MAIL": "250 2.1.0 Ok\r\n",
            "RCPT": "250 2.1.5 Ok\r\n",
            "DATA": "354 End data with <CR><LF>.<CR><LF>\r\n",
            "DOT": "250 2.0.0 Ok: queued as SCRIPTED\r\n",
            "RSET": "250 2.0.0 Ok\r\n",
            "NOOP": "250 2.0.0 Ok\r\n",
            "QUIT": Answer.of("221 2.0.0 Bye\r\n", close=True),
            "VRFY": "252 2.0.0 Maybe\r\n",
        }
        self._queued: dict[str, deque[AnswerSpec]] = {}
        self.transactions: list[Transaction] = []  # every transaction that sent MAIL
        self.commands: list[bytes] = []  # every command line, as received
        self.sessions = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._stopping: asyncio.Event | None = None
        self._open: dict[asyncio.Task[None], asyncio.StreamWriter] = {}  # sessions, ended by stop()
        self._lock = threading.Lock()  # the threaded mode reads lists from another thread

    # -- scripting ---------------------------------------------------------------------------------
    def script(self, verb: str, *answers: AnswerSpec) -> ScriptedPrimary:
        """Queue answers for the next commands `verb` (then the default answers again)."""
        with self._lock:
            self._queued.setdefault(verb.upper(), deque()).extend(answers)
        return self

    def default(self, verb: str, spec: AnswerSpec) -> ScriptedPrimary:
        with self._lock:
            self._defaults[verb.upper()] = spec
        return self

    def _ehlo(self, cmd: Command) -> Answer:
        lines = [self.hostname, *self.extensions]
        out = [f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n" for i, line in enumerate(lines)]
        return Answer.of("".join(out))

    def _answer_for(self, cmd: Command) -> Answer:
        with self._lock:
            queue = self._queued.get(cmd.verb)
            spec = queue.popleft() if queue else self._defaults.get(cmd.verb, "502 5.5.2 Not scripted\r\n")
        if callable(spec) and not isinstance(spec, Answer | bytes | str):
            spec = spec(cmd)
        return _as_answer(spec)

    # -- what was received -------------------------------------------------------------------------
    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def delivered(self) -> list[Transaction]:
        """Transactions whose body arrived and whose final dot got a 2xx: the copies the primary took."""
        with self._lock:
            return [t for t in self.transactions if t.body is not None and t.dot_reply[:1] == b"2"]

    def bodies(self) -> list[bytes]:
        """Every body that reached the final dot, whatever it was answered."""
        with self._lock:
            return [t.body for t in self.transactions if t.body is not None]

    def copies(self, recipient: str) -> int:
        """How many accepted copies name `recipient` (case-insensitive)."""
        return sum(1 for t in self.delivered() for r in t.recipients if r.lower() == recipient.lower())

    # -- running -----------------------------------------------------------------------------------
    async def start(self, port: int = 0) -> ScriptedPrimary:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(self._session, "127.0.0.1", port, limit=LINE_LIMIT)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        """Stop listening and end every open session (Server.close leaves them open)."""
        if self._stopping is not None:
            self._stopping.set()
        if self._server is not None:
            self._server.close()
            self._server = None
        # abort their connections (a cancelled stream task makes asyncio log a spurious error)
        open_sessions = dict(self._open)
        for writer in open_sessions.values():
            writer.transport.abort()
        if open_sessions:
            await asyncio.wait(list(open_sessions), timeout=5)

    @contextmanager
    def running(self, port: int = 0) -> Iterator[ScriptedPrimary]:
        """Run in a thread with its own event loop (for sync tests); stopped on exit."""
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start(port))
            started.set()
            loop.run_forever()

        thread = threading.Thread(target=main, name="scripted-primary", daemon=True)
        thread.start()
        if not started.wait(10):
            raise RuntimeError("scripted primary did not start")
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

    def wait_for(self, cond: Callable[[ScriptedPrimary], bool], timeout: float) -> None:
        """Block until cond(self) holds; AssertionError after `timeout` seconds (a bounded wait)."""
        deadline = time.monotonic() + timeout
        while not cond(self):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"scripted primary: condition not met within {timeout}s; "
                    f"{len(self.transactions)} transactions, last commands "
                    f"{self.commands[-6:]!r}"
                )
            time.sleep(0.05)

    async def until(self, cond: Callable[[ScriptedPrimary], bool], timeout: float) -> None:
        """The same for a test running in the primary's own event loop."""
        deadline = time.monotonic() + timeout
        while not cond(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"scripted primary: condition not met within {timeout}s")
            await asyncio.sleep(0.02)

    # -- one session -------------------------------------------------------------------------------
    async def _send(
        self, writer: asyncio.StreamWriter, answer: Answer, held: list[bytes] | None = None, *, hold: bool = False
    ) -> bool:
        """Write one answer; False when the session is to end (closed or hanging). With `held` (grouped
        mode), `hold` keeps the answer there, else it goes out after what is held, in the same write."""
        if held is not None and hold and not (answer.delay or answer.close or answer.hang):
            held.extend(answer.parts)
            return True
        for i, part in enumerate(answer.parts):
            if answer.delay:
                await asyncio.sleep(answer.delay)
            if held and i == 0:
                part = b"".join(held) + part
                held.clear()
            writer.write(part)
            await writer.drain()
        if answer.hang:
            assert self._stopping is not None
            await self._stopping.wait()
            return False
        if answer.close:
            writer.close()
            return False
        return True

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = writer
        with self._lock:
            self.sessions += 1
        txn = Transaction()
        held: list[bytes] | None = [] if self.grouped else None
        try:
            if not await self._send(writer, self.banner):
                return
            while True:
                line = await reader.readline()
                if not line:
                    return
                with self._lock:
                    self.commands.append(line)
                verb, _, arg = line.rstrip(b"\r\n").partition(b" ")
                name = verb.decode("ascii", "replace").upper()
                if name == "MAIL":
                    txn = Transaction(mail=arg)
                    with self._lock:
                        self.transactions.append(txn)
                elif name == "RSET":
                    txn = Transaction()
                answer = self._answer_for(Command(name, arg, txn))
                if name == "RCPT" and answer.parts and answer.parts[0][:1] == b"2":
                    txn.rcpts.append(arg)
                if not await self._send(writer, answer, held, hold=name in ("MAIL", "RCPT")):
                    return
                if name == "DATA" and answer.parts and answer.parts[0][:3] == b"354":
                    body = await self._read_body(reader, self.keep_bodies, self.body_sizes)
                    if body is None:
                        return
                    dot = self._answer_for(Command("DOT", b"", txn))
                    txn.body = body
                    txn.dot_reply = b"".join(dot.parts)
                    if not await self._send(writer, dot):
                        return
                    txn = Transaction()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            self._open.pop(task, None)
            if not writer.is_closing():
                writer.close()

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, keep: bool, sizes: list[int]) -> bytes | None:
        """Lines up to the lone ".", un-stuffed; None when the client went away first."""
        lines: list[bytes] = []
        size = 0
        while True:
            line = await reader.readline()
            if not line:
                return None
            if line == b".\r\n":
                sizes.append(size)
                return b"".join(lines)
            line = line[1:] if line.startswith(b".") else line
            size += len(line)
            if keep:
                lines.append(line)
