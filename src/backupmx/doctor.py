"""`backupmx doctor`: checks a host before go-live, one ok/warn/fail line per subject with the fix.

Config valid, the installation (version, uvloop), data directory (owner, permissions), free disk
against server.min_free_disk, the SMTP listen addresses bindable, the DNS resolver answering, the clock
synchronised (the kernel's adjtimex status), each primary answering SMTP, the TLS certificate and the
admin token readable only by the service user. It changes nothing on the host. Each check's own
failure (an exception it did not expect) is reported as that check's `fail` line: doctor never ends in a
traceback. Exit 1 on any fail.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import shutil
import socket
import ssl
import stat
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from backupmx.config import Config, load_config, parse_hostport, require_domains
from backupmx.errors import ConfigError


class Mark(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Finding:
    subject: str  # "config", "install", "data_dir", "disk", "listen", "dns", "clock", "primary", "tls", "admin_token"
    mark: Mark
    text: str
    fix: str = ""


Check = Callable[[Config], Awaitable[list[Finding]]]


def _owner_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def service_uid(cfg: Config) -> int:
    """The user serve runs as: the data directory's owner (systemd's StateDirectory gives it to the unit's
    User=), else whoever runs doctor (`sudo -u backupmx backupmx doctor ...` before the first start)."""
    try:
        return cfg.server.data_dir.stat().st_uid
    except OSError:
        return os.geteuid()


# --- the installation -------------------------------------------------------------------------------
async def check_install(cfg: Config) -> list[Finding]:
    from importlib.metadata import PackageNotFoundError, version

    from backupmx import __version__
    from backupmx.extras import FAST_LOOP, installed

    text = f"backupmx {__version__} on Python {sys.version.split()[0]} ({sys.executable})"
    if not installed(FAST_LOOP):
        return [
            Finding(
                "install",
                Mark.WARN,
                text + "; uvloop is missing: serve runs on asyncio's slower loop",
                f"{FAST_LOOP.install} (it does not build on every platform)",
            )
        ]
    try:
        loop = f"uvloop {version('uvloop')}"
    except PackageNotFoundError:
        loop = "uvloop"
    return [Finding("install", Mark.OK, f"{text}, {loop}")]


# --- data directory and disk ------------------------------------------------------------------------
async def check_data_dir(cfg: Config) -> list[Finding]:
    d = cfg.server.data_dir
    try:
        st = d.stat()
    except FileNotFoundError:
        parent = next((p for p in d.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK | os.X_OK):
            return [
                Finding(
                    "data_dir",
                    Mark.WARN,
                    f"{d} does not exist yet; serve creates it (in {parent})",
                    "with the systemd unit, StateDirectory=backupmx creates it for the service user",
                )
            ]
        return [
            Finding(
                "data_dir",
                Mark.FAIL,
                f"{d} does not exist and {parent} is not writable by {_owner_name(os.geteuid())}",
                f"install -d -o backupmx -g backupmx -m 0750 {d} (or let the unit's StateDirectory make it)",
            )
        ]
    except OSError as e:
        return [Finding("data_dir", Mark.FAIL, f"{d}: {e.strerror}", "check the path and its parents' permissions")]
    if not stat.S_ISDIR(st.st_mode):
        return [Finding("data_dir", Mark.FAIL, f"{d} is not a directory", "set server.data_dir to a directory")]
    owner = _owner_name(st.st_uid)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == os.geteuid() and not os.access(d, os.W_OK | os.X_OK):
        return [
            Finding(
                "data_dir",
                Mark.FAIL,
                f"{d} (owner {owner}, mode {mode:04o}) is not writable by its owner",
                f"chmod u+rwx {d}",
            )
        ]
    from backupmx.privatefiles import unsafe_dir

    refusal = unsafe_dir(d)
    if refusal is not None:
        return [_from_refusal("data_dir", refusal)]
    if mode & 0o005:
        return [
            Finding(
                "data_dir",
                Mark.WARN,
                f"{d} (owner {owner}, mode {mode:04o}): other users can list the mail's files",
                f"chmod 700 {d}",
            )
        ]
    return [Finding("data_dir", Mark.OK, f"{d} (owner {owner}, mode {mode:04o})")]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # not reached


async def check_disk(cfg: Config) -> list[Finding]:
    d = cfg.server.data_dir
    where = next((p for p in (d, *d.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free
    need = cfg.server.min_free_disk
    text = f"{_fmt_bytes(free)} free on {where}; server.min_free_disk = {_fmt_bytes(need)}"
    if free < need:
        return [
            Finding(
                "disk",
                Mark.FAIL,
                text + ": MAIL would be answered 452 4.3.1",
                f"free space on {where}'s filesystem, or lower server.min_free_disk",
            )
        ]
    if free < 2 * need:
        return [
            Finding(
                "disk",
                Mark.WARN,
                text + ": less than twice the minimum",
                "give the spool more room: a long outage fills it",
            )
        ]
    return [Finding("disk", Mark.OK, text)]


# --- listeners --------------------------------------------------------------------------------------
def _banner(host: str, port: int, timeout: float = 2.0) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            return s.recv(512).decode("utf-8", "replace").split("\r\n")[0][:120]
    except OSError:
        return ""


async def check_listen(cfg: Config) -> list[Finding]:
    out = []
    for item in cfg.server.listen:
        host, port = parse_hostport(item)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as serve does: TIME_WAIT is no conflict
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
        except PermissionError:
            out.append(
                Finding(
                    "listen",
                    Mark.WARN,
                    f"{item}: {_owner_name(os.geteuid())} may not bind port {port}",
                    "serve needs CAP_NET_BIND_SERVICE: the systemd unit grants it "
                    "(AmbientCapabilities=CAP_NET_BIND_SERVICE); run doctor as root to test the bind",
                )
            )
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                banner = await asyncio.to_thread(_banner, host, port)
                if cfg.server.hostname.lower() in banner.lower():
                    out.append(Finding("listen", Mark.OK, f"{item}: in use by a running backupmx ({banner})"))
                else:
                    out.append(
                        Finding(
                            "listen",
                            Mark.FAIL,
                            f"{item}: in use by another program" + (f" ({banner})" if banner else ""),
                            f"stop it (`ss -ltnp 'sport = :{port}'` names it; e.g. "
                            "`systemctl disable --now postfix`) or change server.listen",
                        )
                    )
            elif e.errno == errno.EADDRNOTAVAIL:
                out.append(
                    Finding(
                        "listen",
                        Mark.FAIL,
                        f"{item}: {host} is not an address of this host",
                        "use one of `ip -brief address`, or 0.0.0.0 / [::]",
                    )
                )
            else:
                out.append(Finding("listen", Mark.FAIL, f"{item}: {e.strerror or e}", "check server.listen"))
        else:
            out.append(Finding("listen", Mark.OK, f"{item}: can be bound"))
    return out


# --- DNS and the primaries --------------------------------------------------------------------------
async def check_dns(cfg: Config) -> list[Finding]:
    import dns.resolver

    from backupmx.delivery.route import DnsNoSuchDomain, DnsPythonLookup, DnsTemporaryError

    servers = ", ".join(cfg.dns.nameservers)
    if not servers:
        try:
            servers = "the system resolver (" + ", ".join(str(s) for s in dns.resolver.Resolver().nameservers) + ")"
        except dns.resolver.NoResolverConfiguration:
            return [
                Finding(
                    "dns",
                    Mark.FAIL,
                    "no [dns] nameservers and no usable /etc/resolv.conf",
                    'set [dns] nameservers = ["IP"] or fix /etc/resolv.conf',
                )
            ]
    lookup = DnsPythonLookup(cfg.dns)
    own = cfg.server.hostname.lower().rstrip(".")
    out = []
    for d in cfg.domains:
        try:
            mx = sorted(await lookup.mx(d.name))
        except DnsTemporaryError as e:
            out.append(
                Finding(
                    "dns",
                    Mark.FAIL,
                    f"{servers}: no answer for {d.name} MX ({e})",
                    "check [dns] nameservers (or /etc/resolv.conf) and that UDP and TCP port 53 to them are open",
                )
            )
            continue
        except DnsNoSuchDomain:
            out.append(
                Finding(
                    "dns",
                    Mark.WARN,
                    f"{servers} answers, but {d.name} does not exist (NXDOMAIN)",
                    f"publish {d.name}'s zone with its MX records",
                )
            )
            continue
        listed = ", ".join(f"{pref} {host}" for pref, host in mx) or "none"
        text = f"{servers} answers: {d.name} MX {listed}"
        ours = [pref for pref, host in mx if host.lower().rstrip(".") == own]
        if not ours:
            out.append(
                Finding(
                    "dns",
                    Mark.WARN,
                    text + f"; {own} is not among them",
                    f"add `{d.name}. IN MX 20 {own}.` (a preference worse than the primary's), "
                    "or set server.hostname to the name in the MX record",
                )
            )
        elif d.primary == ("mx",) and not any(pref < ours[0] for pref, _ in mx):
            out.append(
                Finding(
                    "dns",
                    Mark.FAIL,
                    text + f'; no MX ranks better than {own}: primary = ["mx"] has nowhere to deliver',
                    f"give the primary a lower preference than {own}'s",
                )
            )
        else:
            out.append(Finding("dns", Mark.OK, text))
    return out


async def check_primaries(cfg: Config) -> list[Finding]:
    from backupmx.delivery.route import RouteResolver
    from backupmx.errors import RouteError
    from backupmx.monitor.probe import smtp_probe

    resolver = RouteResolver(cfg)

    async def one(domain: str, rcpt: str | None) -> Finding:
        try:
            route = await resolver.resolve(domain)
        except RouteError as e:
            return Finding(
                "primary",
                Mark.FAIL,
                f"{domain}: no route: {e}",
                'set domains.primary = ["host:port"], or MX records that rank better than this host',
            )
        result = await smtp_probe(
            route.targets,
            local_hostname=cfg.server.hostname,
            timeout=cfg.delivery.probe_timeout.total_seconds(),
            rcpt=rcpt,
        )
        tried = ", ".join(t.label for t in route.targets)
        if result.ok:
            return Finding(
                "primary",
                Mark.OK,
                f"{domain}: {result.target} answers (banner, EHLO" + (f", RCPT {rcpt}" if rcpt else "") + ")",
            )
        return Finding(
            "primary",
            Mark.FAIL,
            f"{domain}: no primary answers ({tried}): {result.error}",
            "allow TCP port 25 from this host to the primary, and check domains.primary",
        )

    return list(await asyncio.gather(*(one(d.name, d.probe_rcpt) for d in cfg.domains)))


# --- clock ------------------------------------------------------------------------------------------
STA_UNSYNC = 0x0040  # <linux/timex.h>: the clock is not synchronised
TIME_ERROR = 5  # adjtimex's return value when the clock is not synchronised
MAX_ERROR_US = 1_000_000  # above a second of estimated maximum error, leases and retention drift visibly


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """struct timex of <sys/timex.h> (glibc, musl) up to `tai`, plus room: only the first fields are read."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 32),
    ]


def read_kernel_clock() -> tuple[int, int, int, int]:
    """(adjtimex state, status bits, maxerror µs, esterror µs) with modes = 0: reads, never sets.
    Through ctypes because the standard library has no adjtimex; raises OSError where it is missing."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    adjtimex = getattr(libc, "adjtimex", None)
    if adjtimex is None:
        raise OSError(errno.ENOSYS, "adjtimex is not available on this system")
    tx = _Timex()
    state = adjtimex(ctypes.byref(tx))
    if state < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(state), int(tx.status), int(tx.maxerror), int(tx.esterror)


def judge_clock(state: int, status: int, maxerror_us: int, esterror_us: int) -> Finding:
    fix = "run an NTP client: `apt install chrony` (or `systemctl enable --now systemd-timesyncd`)"
    if status & STA_UNSYNC or state == TIME_ERROR:
        return Finding(
            "clock",
            Mark.WARN,
            "not synchronised (the kernel reports STA_UNSYNC): retention, leases "
            "and Received: times follow a drifting clock",
            fix,
        )
    if maxerror_us > MAX_ERROR_US:
        return Finding(
            "clock", Mark.WARN, f"synchronised, but the kernel's maximum error is {maxerror_us / 1e6:.1f} s", fix
        )
    return Finding(
        "clock",
        Mark.OK,
        f"synchronised (maximum error {maxerror_us / 1000:.0f} ms, estimated {esterror_us / 1000:.0f} ms)",
    )


async def check_clock(cfg: Config) -> list[Finding]:
    try:
        state, status, maxerror, esterror = read_kernel_clock()
    except OSError as e:
        return [
            Finding(
                "clock",
                Mark.WARN,
                f"cannot read the kernel's clock status: {e.strerror or e}",
                "check `timedatectl` by hand",
            )
        ]
    return [judge_clock(state, status, maxerror, esterror)]


# --- secrets: TLS and the admin token ---------------------------------------------------------------
def _from_refusal(subject: str, refusal: str) -> Finding:
    """privatefiles' "PATH: why; fix: chmod ..." as a fail line: serve refuses to start on it."""
    text, _, fix = refusal.partition("; fix: ")
    return Finding(subject, Mark.FAIL, f"{text} (serve refuses to start)", fix)


def _can_read_as_group(uid: int, gid: int) -> bool:
    import pwd

    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return gid in os.getgrouplist(user.pw_name, user.pw_gid)


def _private(path: Path, subject: str, what: str, uid: int) -> Finding | None:
    """None when only `uid` (the service user) can read `path`. A fail where serve would refuse it (others
    may read or write it: privatefiles.unsafe_secret) or where the service user cannot read it; a warn
    where someone else still can (its group, or another owner)."""
    from backupmx.privatefiles import unsafe_secret

    refusal = unsafe_secret(path, what)
    if refusal is not None:
        return _from_refusal(subject, refusal)
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    user = _owner_name(uid)
    if st.st_uid != uid:
        owner = _owner_name(st.st_uid)
        if not (mode & 0o040 and _can_read_as_group(uid, st.st_gid)):
            return Finding(
                subject,
                Mark.FAIL,
                f"{path} belongs to {owner} (mode {mode:04o}): the service user {user} cannot read it",
                f"chown {user} {path} && chmod 600 {path}",
            )
        return Finding(
            subject,
            Mark.WARN,
            f"{path} belongs to {owner}; {user} reads it through its group "
            f"(mode {mode:04o}), so others in that group can too",
            f"chown {user} {path} && chmod 600 {path}",
        )
    if mode & 0o040:
        return Finding(
            subject, Mark.WARN, f"{path} (mode {mode:04o}) is readable by its group too", f"chmod 600 {path}"
        )
    return None


async def check_tls(cfg: Config) -> list[Finding]:
    cert, key = cfg.server.tls_cert, cfg.server.tls_key
    if cert is None or key is None:
        return [
            Finding(
                "tls",
                Mark.WARN,
                "no server.tls_cert: STARTTLS is not offered, senders send in clear text",
                "set server.tls_cert and tls_key (e.g. a Let's Encrypt certificate for server.hostname)",
            )
        ]
    from backupmx.audit.x509 import parse_certificate

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
        info = parse_certificate(ssl.PEM_cert_to_DER_cert(cert.read_text(encoding="ascii", errors="replace")))
    except (OSError, ssl.SSLError, ValueError) as e:
        return [
            Finding(
                "tls",
                Mark.FAIL,
                f"{cert} / {key} cannot be loaded: {getattr(e, 'strerror', None) or e}",
                "check both paths, that they are a matching PEM pair and readable by the service user",
            )
        ]
    out = []
    key_mode = stat.S_IMODE(key.stat().st_mode)
    if key_mode & 0o007:
        out.append(
            Finding("tls", Mark.FAIL, f"{key} (mode {key_mode:04o}) is readable by every user", f"chmod o-rwx {key}")
        )
    days = (info.not_after - datetime.now(UTC)).total_seconds() / 86400
    names = {n.lower() for n in info.dns_names}
    host = cfg.server.hostname.lower()
    wildcard = "*." + host.partition(".")[2]
    if days < 0:
        out.append(Finding("tls", Mark.FAIL, f"{cert} expired on {info.not_after:%Y-%m-%d}", "renew it"))
    elif names and host not in names and wildcard not in names:
        out.append(
            Finding(
                "tls",
                Mark.WARN,
                f"{cert} is for {', '.join(sorted(names))}, not {host}",
                "get a certificate for server.hostname (senders that verify look for that name)",
            )
        )
    elif days < 14:
        out.append(Finding("tls", Mark.WARN, f"{cert} expires in {days:.0f} days", "renew it"))
    else:
        out.append(Finding("tls", Mark.OK, f"{cert} loads, valid for {days:.0f} more days"))
    return out


async def check_admin_token(cfg: Config) -> list[Finding]:
    from backupmx.admin.auth import GENERATED_TOKEN_FILE, MIN_TOKEN_CHARS

    if not cfg.admin.listen:
        return [Finding("admin_token", Mark.OK, 'the admin listener is off (admin.listen = "")')]
    uid = service_uid(cfg)
    path = cfg.admin.token_file
    if path is None:
        path = cfg.server.data_dir / GENERATED_TOKEN_FILE
        if not path.exists():
            return [Finding("admin_token", Mark.OK, f"none yet: serve writes a random one into {path} (mode 0600)")]
    try:
        private = _private(path, "admin_token", "can use the admin API", uid)
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return [
            Finding(
                "admin_token",
                Mark.FAIL,
                f"{path} does not exist (admin.token_file)",
                f"(umask 077; head -c 32 /dev/urandom | base64 > {path}); chown {_owner_name(uid)} {path}",
            )
        ]
    except OSError as e:
        return [
            Finding(
                "admin_token",
                Mark.FAIL,
                f"{path}: {e.strerror}",
                f"run doctor as the service user ({_owner_name(uid)}) or root",
            )
        ]
    if private is not None and private.mark is Mark.FAIL:
        return [private]
    if len(token) < MIN_TOKEN_CHARS:
        return [
            Finding(
                "admin_token",
                Mark.FAIL,
                f"{path}: the token is shorter than {MIN_TOKEN_CHARS} characters",
                f"head -c 32 /dev/urandom | base64 > {path}",
            )
        ]
    if private is not None:
        return [private]
    return [Finding("admin_token", Mark.OK, f"{path} is readable only by {_owner_name(uid)}")]


CHECKS: tuple[tuple[str, Check], ...] = (
    ("install", check_install),
    ("data_dir", check_data_dir),
    ("disk", check_disk),
    ("listen", check_listen),
    ("dns", check_dns),
    ("clock", check_clock),
    ("primary", check_primaries),
    ("tls", check_tls),
    ("admin_token", check_admin_token),
)


async def _guarded(subject: str, check: Check, cfg: Config) -> list[Finding]:
    try:
        return await check(cfg)
    except Exception as e:  # a check that breaks is that check's fail line; the others still run
        return [
            Finding(
                subject,
                Mark.FAIL,
                f"the check itself failed: {type(e).__name__}: {e}",
                "report this as a bug in backupmx doctor",
            )
        ]


async def diagnose(config_path: str | Path) -> list[Finding]:
    """Every finding, config first; with an invalid config, only that one."""
    try:
        cfg = load_config(config_path)
        require_domains(cfg)
    except ConfigError as e:
        return [
            Finding(
                "config",
                Mark.FAIL,
                str(e).replace("\n", "; "),
                "fix the key named; `backupmx config check --config FILE` repeats this",
            )
        ]
    spool = "PostgreSQL spool (spool.url)" if cfg.spool.postgres else f"SQLite spool in {cfg.server.data_dir}"
    findings = [
        Finding(
            "config",
            Mark.OK,
            f"{cfg.source}: {len(cfg.domains)} domain(s): {', '.join(d.name for d in cfg.domains)}; {spool}",
        )
    ]
    for group in await asyncio.gather(*(_guarded(name, check, cfg) for name, check in CHECKS)):
        findings.extend(group)
    return findings


def render(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"{f.mark.value:4s}  {f.subject:11s}  {f.text}")
        if f.fix and f.mark is not Mark.OK:
            lines.append(f"{'':4s}  {'':11s}  fix: {f.fix}")
    return "\n".join(lines)


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.mark is Mark.FAIL for f in findings) else 0


def run(config_path: str | Path) -> int:
    """The whole command: print the findings, exit 0 (warnings allowed) or 1 (a fail)."""
    findings = asyncio.run(diagnose(config_path))
    print(render(findings))
    sys.stdout.flush()
    return exit_code(findings)
