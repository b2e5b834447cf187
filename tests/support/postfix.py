"""Private Postfix peers for tests and benchmarks: `PostfixInstance` (a whole Postfix with its own config,
queue and data directories under a temp dir, as a primary that delivers to Maildirs or as a backup MX
whose primary is down), `SmtpSink` (smtp-sink with a message counter) and `smtp_source` (the load
generator). They never touch the system Postfix (/etc/postfix, /var/spool/postfix) and bind loopback
only. Every process started here is stopped by `stop()`/`close()`/`with`, and by a watchdog if the
Python process dies first. Needs Debian's postfix package, and root for PostfixInstance."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType

from tests.support.ports import free_port, wait_for_smtp
from tests.support.watchdog import Watchdog

SBIN = Path("/usr/sbin")
POSTFIX = SBIN / "postfix"
POSTQUEUE = SBIN / "postqueue"
POSTSUPER = SBIN / "postsuper"
SMTP_SOURCE = SBIN / "smtp-source"
SMTP_SINK = SBIN / "smtp-sink"

# Queue subdirectories that hold messages (a message is in exactly one of them); bounce/defer/trace hold
# per-message logs, not messages.
_MESSAGE_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class PostfixUnavailable(RuntimeError):
    """Postfix (or root, for a private instance) is not available on this machine."""


def postfix_unavailable_reason() -> str | None:
    """Why a private PostfixInstance cannot run here, or None when it can."""
    for tool in (POSTFIX, POSTQUEUE, POSTSUPER):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its master binds and switches users)"
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError:
        return "the postfix user or the postdrop group is missing (postfix package half-installed)"
    return None


def tools_unavailable_reason() -> str | None:
    """Why smtp-sink/smtp-source cannot run here, or None when they can (no root needed)."""
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing (apt-get install postfix)"
    return None


def _run(
    argv: Sequence[str | Path], *, timeout: float = 30.0, check: bool = True, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {res.returncode}:\n{res.stdout}{res.stderr}")
    return res


def _pids_in_group(pgid: int) -> list[int]:
    """Processes whose process group is `pgid` (the Postfix master is a session leader: its children
    share its group)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..." - comm may contain spaces and parentheses
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            out.append(int(entry.name))
    return out


def _backdate(paths: Iterable[Path], seconds: float = 60.0) -> None:
    """Postfix waits (about 2 s, in 300 ms steps) when main.cf was modified within the last moments,
    in case an editor is still writing it. Our files are complete when written: date them back so a
    start takes about 0.2 s instead of 2.5 s."""
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))


class Role(StrEnum):
    PRIMARY = "primary"  # final destination: virtual mailboxes in Maildirs, unknown users 550 5.1.1
    BACKUP = "backup"  # relay_domains + transport to a (dead) primary: a classic Postfix backup MX


# The services a small Postfix needs; no chroot (the queue directory is a temp dir), no `smtp inet` on
# port 25: the only listener is the one smtpd line added for this instance.
_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n  -  n  60     1  pickup
cleanup   unix  n  -  n  -      0  cleanup
qmgr      unix  n  -  n  300    1  qmgr
rewrite   unix  -  -  n  -      -  trivial-rewrite
bounce    unix  -  -  n  -      0  bounce
defer     unix  -  -  n  -      0  bounce
trace     unix  -  -  n  -      0  bounce
verify    unix  -  -  n  -      1  verify
flush     unix  n  -  n  1000?  0  flush
proxymap  unix  -  -  n  -      -  proxymap
smtp      unix  -  -  n  -      -  smtp
relay     unix  -  -  n  -      -  smtp
showq     unix  n  -  n  -      -  showq
error     unix  -  -  n  -      -  error
retry     unix  -  -  n  -      -  error
discard   unix  -  -  n  -      -  discard
virtual   unix  -  n  n  -      -  virtual
anvil     unix  -  -  n  -      1  anvil
scache    unix  -  -  n  -      1  scache
postlog   unix-dgram n - n - 1  postlogd
"""


class PostfixInstance:
    """One private Postfix: `postfix -c <root>/etc start|stop`, listening only on host:port.

    role="primary": accepts mail for `domain` and delivers it for `users` (local parts) to Maildirs under
    <root>/mail; other users of the domain get 550 5.1.1 at RCPT, other domains 554 5.7.1.
    role="backup": relays `domain` (any local part) to `relay` (default: a loopback port where nothing
    listens, so mail is deferred and held, fsync'd as Postfix always does); `set_relay()` + `flush()`
    later send it to a live peer.

    Use as a context manager, or call start() and close(). `main_cf` adds or overrides main.cf lines.
    """

    def __init__(
        self,
        role: Role | str = Role.PRIMARY,
        *,
        domain: str = "example.test",
        users: Iterable[str] = ("alice", "bob"),
        host: str = "127.0.0.1",
        port: int | None = None,
        relay: tuple[str, int] | None = None,
        myhostname: str | None = None,
        main_cf: Mapping[str, str] | None = None,
        base_dir: Path | None = None,
        mailbox_owner: str = "nobody",
    ) -> None:
        reason = postfix_unavailable_reason()
        if reason:
            raise PostfixUnavailable(reason)
        self.role = Role(role)
        self.domain = domain.lower()
        self.users = [u.lower() for u in users]
        self.host = host
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(host)
        self.relay = relay if relay is not None else ("127.0.0.1", free_port("127.0.0.1"))
        self.myhostname = myhostname or f"{self.role.value}.test"
        self.extra_main = dict(main_cf or {})
        owner = pwd.getpwnam(mailbox_owner)
        self.mailbox_uid, self.mailbox_gid = owner.pw_uid, owner.pw_gid
        # Our own temp dir, world-traversable: Postfix daemons and the mailbox owner must reach their
        # paths, which a pytest tmp_path (under a 0700 /tmp/pytest-of-root) does not allow. Short, too.
        self.root = Path(tempfile.mkdtemp(prefix="bmx-pf-", dir=str(base_dir) if base_dir else None))
        self.root.chmod(0o755)
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.mail_dir = self.root / "mail"
        self.maillog = self.root / "maillog"
        self.master_pid: int | None = None
        self._watchdog: Watchdog | None = None
        self._closed = False
        self._write_config()

    # -- configuration ---------------------------------------------------------------------------------
    def _main_cf(self) -> dict[str, str]:
        ipv6 = ":" in self.host
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.myhostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": self.host,
            "inet_protocols": "ipv6" if ipv6 else "ipv4",
            "mynetworks": "[::1]/128" if ipv6 else "127.0.0.0/8",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtpd_banner": "$myhostname ESMTP Postfix",
            # Relay control only: the client's address (loopback, in mynetworks) grants nothing.
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
        }
        if self.role is Role.PRIMARY:
            main.update(
                {
                    "virtual_mailbox_domains": self.domain,
                    "virtual_mailbox_base": str(self.mail_dir),
                    "virtual_mailbox_maps": f"texthash:{self.config_dir / 'vmailbox'}",
                    "virtual_uid_maps": f"static:{self.mailbox_uid}",
                    "virtual_gid_maps": f"static:{self.mailbox_gid}",
                }
            )
        else:
            main.update(
                {
                    "relay_domains": self.domain,
                    "transport_maps": f"texthash:{self.config_dir / 'transport'}",
                }
            )
        main.update(self.extra_main)
        return main

    def _write_config(self) -> None:
        self.config_dir.mkdir(exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)  # master.lock lives here
        self.mail_dir.mkdir(exist_ok=True)
        os.chown(self.mail_dir, self.mailbox_uid, self.mailbox_gid)
        files = [self.config_dir / "main.cf", self.config_dir / "master.cf"]
        files[0].write_text("".join(f"{k} = {v}\n" for k, v in self._main_cf().items()))
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        files[1].write_text(_MASTER_CF.format(listen=listen))
        if self.role is Role.PRIMARY:
            files.append(self.config_dir / "vmailbox")
            files[-1].write_text("".join(f"{u}@{self.domain} {self.domain}/{u}/\n" for u in self.users))
        else:
            files.append(self.config_dir / "transport")
            rhost, rport = self.relay
            nexthop = f"[{rhost}]:{rport}"
            files[-1].write_text(f"{self.domain} smtp:{nexthop}\n")
        _backdate(files)

    def postconf(self, **params: str) -> None:
        """Change main.cf parameters (and reload when running)."""
        self.extra_main.update(params)
        self._write_config()
        if self.running:
            self.reload()

    def add_users(self, *users: str) -> None:
        """More known users for a primary (and reload when running)."""
        self.users.extend(u.lower() for u in users)
        self._write_config()
        if self.running:
            self.reload()

    def set_relay(self, host: str, port: int) -> None:
        """Point a backup's transport at host:port and restart it when running (a reload is not enough:
        processes that already resolved the old next hop keep it for a while). Deferred mail waits for
        its retry time: call flush() to send it now. (To model "the primary came back", rather start
        the new peer on `relay`'s port: nothing changes in Postfix then.)"""
        if self.role is not Role.BACKUP:
            raise ValueError("set_relay is for a backup instance")
        self.relay = (host, port)
        self._write_config()
        if self.running:
            self.restart()

    # -- lifecycle -------------------------------------------------------------------------------------
    def _postfix(self, *args: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([POSTFIX, "-c", str(self.config_dir), *args], timeout=timeout, check=check)

    @property
    def running(self) -> bool:
        return self.master_pid is not None and bool(_pids_in_group(self.master_pid))

    def start(self, *, timeout: float = 15.0) -> PostfixInstance:
        """Start and wait until the smtpd port greets with 220. About 0.2 s here. When the port was
        chosen by us and was taken meanwhile, retries on another one."""
        if self._closed:
            raise RuntimeError("this instance was closed")
        if self.running:
            return self
        if self._watchdog is None:
            self._watchdog = Watchdog(
                f'{POSTFIX} -c "$1" stop; sleep 2; rm -rf "$2"', str(self.config_dir), str(self.root)
            )
        for attempt in range(3):
            res = self._postfix("start", timeout=timeout, check=False)
            if res.returncode == 0:
                break
            if not self._fixed_port and "in use" in self.log() and attempt < 2:
                self.port = free_port(self.host)
                self._write_config()
                continue
            raise RuntimeError(
                f"postfix start failed ({res.returncode}):\n{res.stdout}{res.stderr}\n"
                f"--- maillog:\n{self.log()[-3000:]}"
            )
        pid_file = self.queue_dir / "pid" / "master.pid"
        self.master_pid = int(pid_file.read_text().split()[0])
        self._fixed_port = True  # from now on this is the instance's address, also after a restart
        try:
            wait_for_smtp(self.host, self.port, timeout=timeout)
        except TimeoutError:
            self.stop()
            raise
        return self

    def reload(self) -> None:
        """`postfix reload`: processes restart when idle and then read the new configuration. It takes
        effect gradually; use restart() when the next message must see the change."""
        self._postfix("reload")

    def restart(self, *, timeout: float = 15.0) -> None:
        """Stop and start again on the same port; the queue is kept."""
        self.stop()
        self.start(timeout=timeout)

    def stop(self, *, timeout: float = 10.0) -> None:
        """`postfix stop`, then wait until every process of this instance is gone (SIGKILL after
        `timeout`). Idempotent."""
        if self.master_pid is None:
            return
        pgid = self.master_pid
        self._postfix("stop", timeout=timeout, check=False)
        deadline = time.monotonic() + timeout
        while _pids_in_group(pgid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _pids_in_group(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            end = time.monotonic() + 5
            while _pids_in_group(pgid) and time.monotonic() < end:
                time.sleep(0.02)
        self.master_pid = None

    def close(self) -> None:
        """Stop and remove the temp dir (mail, queue and log with it)."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
            shutil.rmtree(self.root, ignore_errors=True)
            if self._watchdog is not None:
                self._watchdog.disarm()
                self._watchdog = None

    def __enter__(self) -> PostfixInstance:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PostfixInstance {self.role.value} {self.domain} on {self.host}:{self.port} at {self.root}>"

    # -- queue -----------------------------------------------------------------------------------------
    def queue_counts(self) -> dict[str, int]:
        """Queue files per queue (maildrop, incoming, active, deferred, hold), one scan."""
        counts = {}
        for q in _MESSAGE_QUEUES:
            counts[q] = sum(len(files) for _d, _s, files in os.walk(self.queue_dir / q))
        return counts

    def queue_count(self) -> int:
        """Messages in the queue, by counting queue files (cheap enough to poll at 20,000 messages).
        Scans until two scans agree: a file moving between queues may be seen twice or not at all."""
        last = -1
        for _ in range(50):
            n = sum(self.queue_counts().values())
            if n == last:
                return n
            last = n
        return last

    def postqueue_count(self) -> int:
        """Messages per `postqueue -p` (the operator's view). showq reads the queues one after the other,
        so while Postfix moves mail (active -> deferred) it may count a message twice: this reads until
        two answers agree. Exact once the queue is settled (see wait_settled)."""
        last = -1
        for _ in range(20):
            out = _run([POSTQUEUE, "-c", str(self.config_dir), "-p"], timeout=120).stdout
            if "Mail queue is empty" in out:
                n = 0
            else:
                m = re.search(r"in (\d+) Requests?\.", out)
                if not m:
                    raise RuntimeError(f"cannot read postqueue -p output: {out[-300:]!r}")
                n = int(m.group(1))
            if n == last:
                return n
            last = n
        return last

    def wait_settled(self, count: int, *, timeout: float = 60.0, interval: float = 0.05) -> dict[str, int]:
        """Backup with a dead primary: wait until `count` messages sit in the deferred queue (each was
        tried once and deferred) and no other queue holds any. Returns the last queue_counts()."""
        deadline = time.monotonic() + timeout
        counts = self.queue_counts()
        while time.monotonic() < deadline:
            if counts["deferred"] == count and sum(counts.values()) == count:
                break
            time.sleep(interval)
            counts = self.queue_counts()
        return counts

    def wait_queue_count(self, count: int, *, timeout: float = 30.0, interval: float = 0.05) -> int:
        """Wait until queue_count() == count; returns the last count (check it: no exception)."""
        deadline = time.monotonic() + timeout
        n = self.queue_count()
        while n != count and time.monotonic() < deadline:
            time.sleep(interval)
            n = self.queue_count()
        return n

    def flush(self) -> None:
        """`postqueue -f`: attempt delivery of all queued mail now."""
        _run([POSTQUEUE, "-c", str(self.config_dir), "-f"])

    def purge(self) -> None:
        """`postsuper -d ALL`: delete every queued message."""
        _run([POSTSUPER, "-c", str(self.config_dir), "-d", "ALL"], timeout=300)

    # -- mailboxes (primary) ---------------------------------------------------------------------------
    def maildir(self, user: str) -> Path:
        return self.mail_dir / self.domain / user.lower()

    def maildir_messages(self, user: str) -> list[bytes]:
        """Messages delivered to `user`, oldest first, as stored (Postfix adds Return-Path:,
        Delivered-To: and its Received: at the top, and writes LF line endings)."""
        box = self.maildir(user)
        files: list[Path] = []
        for sub in ("new", "cur"):
            d = box / sub
            if d.is_dir():
                files.extend(p for p in d.iterdir() if p.is_file())
        files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def wait_for_messages(self, user: str, count: int = 1, *, timeout: float = 15.0) -> list[bytes]:
        """Wait until `user` has at least `count` messages; returns them (maybe fewer on timeout)."""
        deadline = time.monotonic() + timeout
        msgs = self.maildir_messages(user)
        while len(msgs) < count and time.monotonic() < deadline:
            time.sleep(0.05)
            msgs = self.maildir_messages(user)
        return msgs

    def log(self) -> str:
        """The instance's mail log."""
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class SmtpSink:
    """smtp-sink on host:port: accepts every message and throws it away (with dump=True, writes each to
    a file in `dump_dir` too: slower), counting messages. Stops reliably (SIGTERM, then SIGKILL) on close/exit.

    `messages` reads smtp-sink's running counter (-c), so it is exact while it runs and after it stops.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        backlog: int = 1000,
        max_connections: int = 256,
        hostname: str = "sink.test",
        dump: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        reason = tools_unavailable_reason()
        if reason:
            raise PostfixUnavailable(reason)
        self.host = host
        self.port = port if port is not None else free_port(host)
        # Our own world-traversable temp dir: as root, smtp-sink runs as nobody and writes dumps there.
        self.workdir = Path(tempfile.mkdtemp(prefix="bmx-sink-"))
        self.workdir.chmod(0o755)
        self.dump_dir = self.workdir / "dump" if dump else None
        self.counter_file = self.workdir / f"smtp-sink-{self.port}.out"
        argv = [str(SMTP_SINK), "-c", "-h", hostname, "-m", str(max_connections)]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # required by smtp-sink when run as root
        if self.dump_dir is not None:
            self.dump_dir.mkdir()
            if os.geteuid() == 0:
                os.chown(self.dump_dir, pwd.getpwnam("nobody").pw_uid, -1)
            argv += ["-d", f"{self.dump_dir}/m."]
        listen = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.argv = [*argv, *extra_args, listen, str(backlog)]
        self.proc: subprocess.Popen[bytes] | None = None
        self._watchdog: Watchdog | None = None

    def start(self, *, timeout: float = 10.0) -> SmtpSink:
        if self.proc is not None and self.proc.poll() is None:
            return self
        with open(self.counter_file, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self._watchdog = Watchdog('kill -9 "$1"; sleep 1; rm -rf "$2"', str(self.proc.pid), str(self.workdir))
        try:
            wait_for_smtp(self.host, self.port, timeout=timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"smtp-sink did not start: {self._tail(500)!r}") from None
        return self

    def _tail(self, n: int = 256) -> str:
        try:
            with open(self.counter_file, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _counter(self, name: str) -> int:
        found = re.findall(rf"\b{name}=(\d+)", self._tail())
        return int(found[-1]) if found else 0

    @property
    def messages(self) -> int:
        """Messages received so far (a final "." was read)."""
        return self._counter("mesg")

    @property
    def sessions(self) -> int:
        return self._counter("sess")

    def wait_messages(self, count: int, *, timeout: float = 30.0, interval: float = 0.05) -> int:
        """Wait until at least `count` messages arrived; returns the last count (check it)."""
        deadline = time.monotonic() + timeout
        n = self.messages
        while n < count and time.monotonic() < deadline:
            time.sleep(interval)
            n = self.messages
        return n

    def dumped_messages(self) -> list[bytes]:
        """With dump=True: each received message as smtp-sink wrote it (its X-* headers first)."""
        if self.dump_dir is None:
            raise ValueError("this sink was made without dump=True")
        return [p.read_bytes() for p in sorted(self.dump_dir.iterdir(), key=lambda p: p.stat().st_mtime_ns)]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, timeout: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._watchdog is not None:
            self._watchdog.disarm()
            self._watchdog = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> SmtpSink:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class SmtpSourceResult:
    returncode: int  # 0 = every message got 250; smtp-source stops at the first unexpected reply
    elapsed: float  # seconds, wall clock, for the whole run
    messages: int
    sessions: int
    size_bytes: int
    output: str  # smtp-source's stdout + stderr (its errors)
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def rate(self) -> float:
        """Messages per second (meaningful only when ok)."""
        return self.messages / self.elapsed if self.elapsed > 0 else 0.0


def smtp_source(
    host: str,
    port: int,
    *,
    messages: int = 1,
    sessions: int = 1,
    size_kb: float = 5,
    sender: str = "sender@source.test",
    recipient: str = "alice@example.test",
    one_msg_per_session: bool = True,
    recipients_per_msg: int = 1,
    helo: str = "source.test",
    timeout: float = 300.0,
    extra_args: Sequence[str] = (),
) -> SmtpSourceResult:
    """Run /usr/sbin/smtp-source: `messages` messages of `size_kb` KiB payload (plus its few headers)
    over `sessions` parallel SMTP sessions. By default each message has its own session (connect, EHLO,
    MAIL, RCPT, DATA, QUIT), as mail from many senders arrives; one_msg_per_session=False keeps each
    connection for several messages (-d). recipients_per_msg > 1 prefixes numbers to the local part
    (-r: "1alice@..."). Killed after `timeout` seconds (timed_out=True)."""
    reason = tools_unavailable_reason()
    if reason:
        raise PostfixUnavailable(reason)
    size = int(size_kb * 1024)
    argv = [
        str(SMTP_SOURCE),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        sender,
        "-t",
        recipient,
        "-M",
        helo,
    ]
    if not one_msg_per_session:
        argv.append("-d")
    if recipients_per_msg != 1:
        argv += ["-r", str(recipients_per_msg)]
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    argv += [*extra_args, target]
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        timed_out = True
    except BaseException:  # ^C: it has its own session, so it would not get the SIGINT
        proc.kill()
        proc.wait(timeout=10)
        raise
    elapsed = time.perf_counter() - started
    return SmtpSourceResult(
        returncode=proc.returncode,
        elapsed=elapsed,
        messages=messages,
        sessions=sessions,
        size_bytes=size,
        output=out.decode(errors="replace"),
        timed_out=timed_out,
    )
