"""The one TOML configuration file, validated at start into a frozen tree.

Errors name the file and the key (`backupmx.toml: delivery.retry_min: must be at least 1s`).
Durations are written "1s", "5m", "2h", "30d" (and combinations like "1h30m"); sizes "50MB", "512KiB".
The key names documented in the README are a contract: add keys, never rename without an alias.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from backupmx.errors import ConfigError
from backupmx.extras import POSTGRES, installed, missing

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=float(value))
    if not isinstance(value, str):
        raise ValueError('a duration such as "30s", "5m", "2h" or "30d"')
    text = value.strip().replace(" ", "")
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f'{value!r} is not a duration such as "30s", "5m", "2h" or "30d"')
    return timedelta(seconds=total)


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "ki": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "mi": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "gi": 1024**3,
}


def parse_size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError('a size such as "50MB" or "512KiB"')
    m = _SIZE_RE.match(value.strip())
    if not m:
        raise ValueError(f'{value!r} is not a size such as "50MB" or "512KiB"')
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


def _at_least_1s(v: timedelta) -> timedelta:
    if v < timedelta(seconds=1):
        raise ValueError("must be at least 1s")
    return v


def _one_or_list(v: Any) -> Any:
    """A lone string stands for a list of one (`listen = "[::]:25"`)."""
    return (v,) if isinstance(v, str) else v


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
Duration1s = Annotated[Duration, AfterValidator(_at_least_1s)]  # timers and TTLs: 0s would spin or expire at once
Size = Annotated[int, BeforeValidator(parse_size)]
Names = Annotated[tuple[str, ...], BeforeValidator(_one_or_list)]


def parse_hostport(value: str, default_port: int = 25) -> tuple[str, int]:
    """ "mx1.example.com:25", "[::1]:2525", "127.0.0.1" -> (host, port)."""
    v = value.strip()
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
        return host, port
    if v.count(":") == 1:
        host, _, port_s = v.partition(":")
        return host, int(port_s)
    return v, default_port


def _hostport(item: str, *, default_port: int = 25) -> tuple[str, int]:
    """parse_hostport with the message every host:port key gives."""
    try:
        return parse_hostport(item, default_port)
    except ValueError as e:
        raise ValueError(f"{item!r} is not host:port") from e


def _http_url(v: str | None, wrong: str) -> str | None:
    """An http(s) base address without its trailing slash; `wrong` is the key's own message."""
    if v is None:
        return v
    v = v.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", v):
        raise ValueError(wrong)
    return v


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerConfig(_Frozen):
    hostname: str = Field(default_factory=socket.getfqdn)
    node_name: str = ""  # this node's name in Received headers, logs and leases; defaults to hostname
    listen: Names = ("0.0.0.0:25", "[::]:25")
    data_dir: Path = Path("/var/lib/backupmx")
    max_message_size: Size = 50_000_000
    max_recipients: int = Field(1000, ge=100)
    max_connections: int = Field(500, ge=1)
    max_connections_per_ip: int = Field(50, ge=1)
    max_commands: int = Field(10_000, ge=10)  # per session
    max_received_headers: int = Field(50, ge=1)
    idle_timeout: Duration = timedelta(minutes=5)
    session_timeout: Duration = timedelta(hours=1)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    greeting_delay: Duration = timedelta(0)
    min_free_disk: Size = 100_000_000
    # 554 5.5.0 and disconnect for a client that sends before our EHLO/HELO or DATA reply (Postfix's
    # smtpd_forbid_unauth_pipelining, on by default since Postfix 3.9): real MTAs wait, bots do not
    forbid_early_pipelining: bool = True

    @field_validator("listen")
    @classmethod
    def _listen_ok(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            _hostport(item)
        return v

    @property
    def node(self) -> str:
        return self.node_name or self.hostname


class DomainConfig(_Frozen):
    name: str
    primary: Names = ("mx",)
    recipients: str | tuple[str, ...] = "any"
    accept: Literal["always", "when_primary_down"] = "always"
    unknown_while_down: Literal["defer", "accept", "reject"] = "accept"
    tls_verify: bool = False
    probe_rcpt: str | None = None  # a known-good address the health probe may RCPT to (then RSET)
    # recipients = "verify": how long an answer of the primary is trusted (frozen while it is DOWN)
    verify_positive_ttl: Duration1s = timedelta(days=30)
    verify_negative_ttl: Duration1s = timedelta(days=1)
    filter: bool = True  # ask [filter] rspamd about this domain's mail (when configured)
    spf_reject: bool = False  # refuse SPF "fail" (550 5.7.1): at MAIL when every domain says so, else at RCPT
    dmarc_reject: bool = False  # [policy] dmarc: refuse dmarc=fail with p=reject (550 5.7.1 at the final dot)
    # recipients = "ldap://host:389" (or ldaps://): synced from a directory (backupmx.policy.ldap)
    ldap_base: str = ""  # the search base, e.g. "ou=people,dc=example,dc=com"
    ldap_filter: str = "(|(mail=*)(proxyAddresses=*))"
    ldap_attributes: Names = ("mail", "proxyAddresses")  # proxyAddresses: "smtp:"/"SMTP:" values
    ldap_bind_dn: str = ""  # empty = anonymous
    ldap_password_file: Path | None = None  # the bind password, first line
    ldap_interval: Duration1s = timedelta(minutes=5)
    ldap_timeout: Duration1s = timedelta(seconds=30)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.strip().lower().rstrip(".")
        if not v or " " in v or "@" in v:
            raise ValueError("must be a domain name such as example.com")
        return v

    @field_validator("primary")
    @classmethod
    def _primary_ok(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError('needs at least one host:port, or ["mx"]')
        if "mx" in v and len(v) > 1:
            raise ValueError('["mx"] stands alone: either the MX hosts or a host:port list')
        for item in v:
            if item != "mx":
                _hostport(item)
        return v

    @field_validator("recipients", mode="before")
    @classmethod
    def _recipients(cls, v: Any) -> Any:
        if isinstance(v, list):
            return tuple(str(x) for x in v)
        if isinstance(v, str) and v not in ("any", "verify") and not v.startswith(("file:", "ldap://", "ldaps://")):
            raise ValueError('must be "any", "verify", "file:PATH", "ldap://HOST[:PORT]" or a list of addresses')
        return v

    @model_validator(mode="after")
    def _ldap_needs_base(self) -> DomainConfig:
        if self.ldap_url is not None and not self.ldap_base:
            raise ValueError('recipients = "ldap://..." needs ldap_base (the search base)')
        return self

    @property
    def ldap_url(self) -> str | None:
        r = self.recipients
        return r if isinstance(r, str) and r.startswith(("ldap://", "ldaps://")) else None

    @property
    def primary_hosts(self) -> list[tuple[str, int]] | None:
        """None when the primary is the domain's MX hosts ranked better than us."""
        if self.primary == ("mx",):
            return None
        return [parse_hostport(p) for p in self.primary]


class DeliveryConfig(_Frozen):
    retry_min: Duration1s = timedelta(minutes=1)
    retry_max: Duration1s = timedelta(hours=1)
    retention: Duration1s = timedelta(days=30)
    retention_cap: Duration1s = timedelta(days=90)
    probe_interval: Duration1s = timedelta(seconds=30)
    probe_timeout: Duration1s = timedelta(seconds=10)
    down_after: int = Field(2, ge=1)  # consecutive failed probes before a destination is DOWN
    recovery_guard: Duration1s = timedelta(hours=6)
    delay_warning: Duration | None = None  # off by default
    concurrency_initial: int = Field(2, ge=1)
    concurrency_max: int = Field(20, ge=1)
    messages_per_connection: int = Field(100, ge=1)
    window: int = Field(1000, ge=10)  # recipients claimed into memory at most
    connect_timeout: Duration1s = timedelta(seconds=30)
    command_timeout: Duration = timedelta(minutes=5)
    data_timeout: Duration = timedelta(minutes=10)  # reply to the final dot (RFC 5321 4.5.3.2.6)
    lease: Duration1s = timedelta(minutes=15)
    poison_after: int = Field(5, ge=1)  # unexpected errors in a row before a message is held as poison


class PolicyConfig(_Frozen):
    """Anti-abuse and the trust hand-off to the primary (docs/edge.md)."""

    rate_limit: int = Field(0, ge=0)  # messages (MAIL commands) per minute per client IP; 0 = no limit
    rate_burst: int = Field(0, ge=0)  # messages a client may send at once; 0 = the same as rate_limit
    dnsbl: Names = ()  # DNS blocklist zones, e.g. ["zen.spamhaus.org"]
    spf: bool = False  # check SPF, add Authentication-Results (RFC 8601) for the primary
    authserv_id: str = ""  # the authserv-id of that header; empty = server.hostname
    dkim: bool = False  # verify DKIM signatures at the final dot; the result joins SPF's field (filter/auth.py)
    dmarc: bool = False  # evaluate DMARC (with DKIM and SPF); see domains[].dmarc_reject
    # ARC (RFC 8617): seal our Authentication-Results with this key (RSA PEM), published at
    # <arc_selector>._domainkey.<arc_domain>; all three together (filter/auth.py)
    arc_key: Path | None = None
    arc_selector: str = ""
    arc_domain: str = ""

    @model_validator(mode="after")
    def _arc_together(self) -> PolicyConfig:
        if (self.arc_key is None) != (not self.arc_selector) or (self.arc_key is None) != (not self.arc_domain):
            raise ValueError("arc_key, arc_selector and arc_domain go together")
        return self

    @field_validator("dnsbl")
    @classmethod
    def _dnsbl_zones(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for zone in v:
            z = zone.strip().lower().rstrip(".")
            if not z or any(c.isspace() for c in z) or "@" in z or ".." in z:
                raise ValueError(f"{zone!r} is not a DNS zone such as zen.spamhaus.org")
            out.append(z)
        return tuple(out)


class FilterConfig(_Frozen):
    """Content filtering at the final dot (backupmx.filter, docs/edge.md): off unless `rspamd` is set."""

    rspamd: str | None = None  # "http://127.0.0.1:11333": rspamd's normal worker (POST /checkv2)
    timeout: Duration = timedelta(seconds=15)  # the whole scan; beyond it, on_error applies
    password: str = ""  # sent as the Password header (needed only behind a controller or proxy that asks)
    on_error: Literal["accept", "tempfail"] = "accept"  # rspamd unreachable, slow or confused

    @field_validator("rspamd")
    @classmethod
    def _rspamd_url(cls, v: str | None) -> str | None:
        return _http_url(v, 'must be an http:// address such as "http://127.0.0.1:11333"')

    @field_validator("timeout")
    @classmethod
    def _timeout_ok(cls, v: timedelta) -> timedelta:
        if v < timedelta(milliseconds=100) or v > timedelta(minutes=5):
            raise ValueError("must be between 100ms and 5m")
        return v


class AdminConfig(_Frozen):
    listen: str | None = "127.0.0.1:8025"
    token_file: Path | None = None


class DnsConfig(_Frozen):
    nameservers: tuple[str, ...] = ()  # "IP" or "IP:PORT"; empty = the system resolver
    timeout: Duration = timedelta(seconds=5)


class LogConfig(_Frozen):
    format: Literal["text", "json"] = "text"
    maillog: Path | None = None  # default: stderr, with the diagnostic log
    level: Literal["debug", "info", "warning", "error"] = "info"


class SpoolConfig(_Frozen):
    url: str | None = None  # postgresql://... for many nodes; None = SQLite in server.data_dir
    # finished messages (every recipient delivered/bounced/expired) stay this long for `queue show`,
    # the dashboard and audits, then they are purged
    keep_finished: Duration = timedelta(days=7)
    purge_interval: Duration = timedelta(hours=1)

    @field_validator("url")
    @classmethod
    def _url_ok(cls, v: str | None) -> str | None:
        # anything else used to fall back to SQLite silently: a typo must not split a shared queue
        if v is not None and not v.startswith(POSTGRES_SCHEMES):
            raise ValueError("must be a postgresql://... URL (leave it out for the SQLite spool in server.data_dir)")
        return v

    @property
    def postgres(self) -> bool:
        return self.url is not None


class CanaryConfig(_Frozen):
    """One `[[canary]]` entry (none = off): every `interval` a marked message for `to` goes through this node's
    own SMTP listener, queue and relay to the domain's primary; not delivered within `deadline` while the
    primary is up = "backup path broken" (backupmx.monitor.canary)."""

    domain: str
    to: str  # the canary mailbox at the primary; an address in `domain`
    mail_from: str = ""  # the envelope sender; "" is the null sender <> (nobody ever gets a bounce)
    interval: Duration1s = timedelta(minutes=15)
    deadline: Duration1s = timedelta(minutes=5)

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        return v.strip().lower().rstrip(".")

    @field_validator("to")
    @classmethod
    def _to(cls, v: str) -> str:
        v = v.strip().removeprefix("<").removesuffix(">")
        local, at, domain = v.rpartition("@")
        if not at or not local or not domain or " " in v:
            raise ValueError("must be an address such as canary@example.com")
        return f"{local}@{domain.lower()}"


def is_loopback(host: str) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ContinuityConfig(_Frozen):
    """The emergency inbox (backupmx.continuity): recipients read their held mail during a long outage.
    Off by default; opens per domain while an outage is declared or the operator opened it by hand."""

    enabled: bool = False
    listen: str = "127.0.0.1:8026"  # its own listener, never the admin one
    base_url: str | None = None  # the public address put in sign-in links; default http://<listen>
    tls_cert: Path | None = None
    tls_key: Path | None = None
    secret_file: Path | None = None  # signing key; default data_dir/continuity.key (share it between nodes)
    link_ttl: Duration1s = timedelta(hours=24)  # a sign-in link works once, within this time
    session_ttl: Duration1s = timedelta(hours=12)  # a signed-in browser, never past the grant
    grant_default: Duration1s = timedelta(days=7)  # `access grant` without --expires
    grant_max: Duration1s = timedelta(days=90)
    smarthost: str | None = None  # "host:port" for `access grant --notify`; never a protected primary
    notify_from: str | None = None  # envelope and From: of those notices; default postmaster@<hostname>
    audit_log: Path | None = None  # default data_dir/continuity-audit.log
    timezone: str = "UTC"  # dates in the inbox, e.g. "Asia/Seoul"

    @field_validator("listen")
    @classmethod
    def _listen_ok(cls, v: str) -> str:
        _hostport(v, default_port=8026)
        return v

    @field_validator("smarthost")
    @classmethod
    def _smarthost_ok(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, _ = _hostport(v, default_port=25)
        if not host:
            raise ValueError(f"{v!r} is not host:port")
        return v

    @field_validator("base_url")
    @classmethod
    def _base_url_ok(cls, v: str | None) -> str | None:
        return _http_url(v, "must be an http:// or https:// address such as https://mail-backup.example.com")

    @field_validator("timezone")
    @classmethod
    def _timezone_ok(cls, v: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f'{v!r} is not a time zone such as "UTC" or "Asia/Seoul"') from e
        return v

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_hostport(self.listen, default_port=8026)

    @property
    def public_url(self) -> str:
        """Where sign-in links point: base_url, or the listener itself."""
        if self.base_url:
            return self.base_url
        host, port = self.listen_address
        scheme = "https" if self.tls_cert else "http"
        if host in ("0.0.0.0", "::", ""):
            host = "localhost"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _check_continuity(cfg: Config, source: str) -> None:
    c = cfg.continuity
    if (c.tls_cert is None) != (c.tls_key is None):
        raise ConfigError(f"{source}: continuity.tls_cert: tls_cert and tls_key go together")
    if not c.enabled:
        return
    host, _ = c.listen_address
    https = c.tls_cert is not None or (c.base_url or "").startswith("https://")
    if not is_loopback(host) and not https:
        raise ConfigError(
            f"{source}: continuity.listen: {c.listen} is not a loopback address; set "
            "continuity.tls_cert and tls_key, or serve it behind an HTTPS proxy and set "
            'continuity.base_url = "https://..."'
        )
    if c.grant_default > c.grant_max:
        raise ConfigError(f"{source}: continuity.grant_default: must not be longer than continuity.grant_max")
    if c.smarthost:
        target = parse_hostport(c.smarthost, default_port=25)
        for d in cfg.domains:
            hosts = d.primary_hosts or []
            if any(h.lower() == target[0].lower() and p == target[1] for h, p in hosts):
                raise ConfigError(
                    f"{source}: continuity.smarthost: {c.smarthost} is the primary of {d.name}; "
                    "sign-in links must not go through the protected primary"
                )


class Condition(StrEnum):
    PRIMARY_DOWN = "primary_down"  # per domain: an outage is declared (the primary is DOWN); ends when it leaves DOWN
    OUTAGE_LONG = "outage_long"  # per domain: the declared outage is older than outage_longer_than
    HELD_MAIL = "held_mail"  # per domain: recipients waiting (queued + held) above held_above
    OLDEST_MESSAGE = "oldest_message"  # per domain: the oldest waiting message is older than oldest_older_than
    FREE_DISK = "free_disk"  # the node: free space on the data directory below free_disk_below
    DELIVERY_FAILING = "delivery_failing"  # per domain: the primary answers, but refuses or fails deliveries
    BACKUP_PATH_BROKEN = "backup_path_broken"  # per domain: the canary ([[canary]]) failed while the primary was up
    MAIL_SET_ASIDE = "mail_set_aside"  # per domain: recipients held as poison or by the recovery guard (review them)


class AlertConfig(BaseModel):
    """One `[[alerts]]` entry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["webhook", "email"]
    name: str = ""  # for logs and the notice; defaults to the kind and target
    # the conditions this destination wants
    on: Annotated[tuple[Condition, ...], BeforeValidator(_one_or_list)] = tuple(Condition)
    interval: Duration1s = timedelta(seconds=30)  # how often conditions are evaluated (the smallest wins)
    # webhook: a JSON POST
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)  # e.g. {Authorization = "Bearer ..."}
    # email: through a smarthost, never through a protected primary
    smarthost: str | None = None  # "host:port"
    mail_from: str | None = None
    to: tuple[str, ...] = ()
    # delivery of the notice itself
    timeout: Duration1s = timedelta(seconds=10)
    attempts: int = Field(6, ge=1, le=20)
    retry_min: Duration1s = timedelta(seconds=2)
    retry_max: Duration1s = timedelta(minutes=5)
    # thresholds
    outage_longer_than: Duration = timedelta(hours=1)
    held_above: int = Field(1000, ge=0)
    oldest_older_than: Duration = timedelta(days=2)
    free_disk_below: Size = 1_000_000_000
    delivery_failures: int = Field(5, ge=1)  # failures (not "primary unreachable") since the last success ...
    failure_window: Duration1s = timedelta(minutes=15)  # ... within this window

    @model_validator(mode="after")
    def _kind_fields(self) -> AlertConfig:
        if self.kind == "webhook":
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ValueError('a webhook needs url = "http(s)://..."')
        else:
            if not self.smarthost or not self.mail_from or not self.to:
                raise ValueError("an email alert needs smarthost, mail_from and to")
            try:
                parse_hostport(self.smarthost)
            except ValueError as e:
                raise ValueError(f"smarthost: {self.smarthost!r} is not host:port") from e
        if self.retry_max < self.retry_min:
            raise ValueError("retry_max must not be shorter than retry_min")
        return self

    @property
    def label(self) -> str:
        return self.name or (f"webhook {self.url}" if self.kind == "webhook" else f"email via {self.smarthost}")


class Config(_Frozen):
    server: ServerConfig = ServerConfig()
    domains: tuple[DomainConfig, ...] = ()
    canary: tuple[CanaryConfig, ...] = ()  # [[canary]], one per protected domain at most
    delivery: DeliveryConfig = DeliveryConfig()
    admin: AdminConfig = AdminConfig()
    dns: DnsConfig = DnsConfig()
    policy: PolicyConfig = PolicyConfig()
    filter: FilterConfig = FilterConfig()
    log: LogConfig = LogConfig()
    spool: SpoolConfig = SpoolConfig()
    continuity: ContinuityConfig = ContinuityConfig()
    alerts: tuple[AlertConfig, ...] = ()  # [[alerts]] (backupmx.monitor.alerts)
    source: str = "<defaults>"  # the file this came from, for messages

    def domain(self, name: str) -> DomainConfig | None:
        name = name.lower()
        for d in self.domains:
            if d.name == name:
                return d
        return None

    @property
    def domain_names(self) -> frozenset[str]:
        return frozenset(d.name for d in self.domains)


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: no such file") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from e
    return config_from_dict(raw, source=str(p))


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        cfg = Config.model_validate({**raw, "source": source})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = _pretty_loc(err["loc"], raw)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            lines.append(f"{source}: {loc}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    names = [d.name for d in cfg.domains]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"{source}: domains: {sorted(dupes)[0]} is listed twice")
    if cfg.delivery.retry_max < cfg.delivery.retry_min:
        raise ConfigError(f"{source}: delivery.retry_max: must not be shorter than delivery.retry_min")
    if cfg.delivery.retention_cap < cfg.delivery.retention:
        raise ConfigError(f"{source}: delivery.retention_cap: must not be shorter than delivery.retention")
    for i, c in enumerate(cfg.canary):
        where = f"{source}: canary[{i}]"
        d = cfg.domain(c.domain)
        if d is None:
            raise ConfigError(f"{where}.domain: {c.domain} is not one of the [[domains]]")
        if c.to.rpartition("@")[2] != d.name:
            raise ConfigError(f"{where}.to: {c.to} is not an address in {d.name}")
        if d.accept == "when_primary_down":
            raise ConfigError(
                f"{where}.domain: {d.name} accepts mail only while its primary is down, "
                "so the canary could never pass this node's listener"
            )
        if [x.domain for x in cfg.canary].count(c.domain) > 1:
            raise ConfigError(f"{where}.domain: {c.domain} has more than one [[canary]]")
    if (cfg.server.tls_cert is None) != (cfg.server.tls_key is None):
        raise ConfigError(f"{source}: server.tls_cert: tls_cert and tls_key go together")
    _check_continuity(cfg, source)
    if cfg.spool.postgres and not installed(POSTGRES):
        raise ConfigError(f"{source}: {missing(POSTGRES, 'spool.url')}")
    return cfg


def require_domains(cfg: Config) -> None:
    """`serve` and `config check` refuse a config that protects nothing: it would bind port 25 on every
    interface only to refuse every recipient (a new user's empty file must not look "ok")."""
    if not cfg.domains:
        raise ConfigError(
            f"{cfg.source}: domains: no [[domains]]: this node would protect nothing; add one "
            '(name = "example.com", primary = ["mx1.example.com:25"]), see the README'
        )


def _pretty_loc(loc: tuple[int | str, ...], raw: dict[str, Any]) -> str:
    """("domains", 0, "primary") -> "domains[0](example.com).primary"."""
    parts: list[str] = []
    node: Any = raw
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            try:
                node = node[item]
                if isinstance(node, dict) and "name" in node:
                    label = f"[{item}]({node['name']})"
            except (IndexError, KeyError, TypeError):
                node = None
            if parts:
                parts[-1] += label
            else:
                parts.append(label)
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts)
