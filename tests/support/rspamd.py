"""A private rspamd from Debian's package (/usr/bin/rspamd) for tests: one normal worker on a loopback port,
Debian's stock rules with every module that needs DNS, redis or the network turned off, DNS pointed at a
loopback port where nothing listens, GTUBE test patterns on (XJS... reject, YJS... add header, ZJS...
rewrite subject), and a multimap rule that answers "soft reject" for the envelope sender
softreject@spam.test. It starts in about a second; `stop()` ends it (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.support.peer_process import PeerProcess
from tests.support.ports import free_port

RSPAMD = shutil.which("rspamd") or "/usr/bin/rspamd"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE_ADD_HEADER = b"Y" + GTUBE[1:]
GTUBE_REWRITE_SUBJECT = b"Z" + GTUBE[1:]
SOFT_REJECT_SENDER = "softreject@spam.test"

# modules that query DNS (RBLs, SPF, DKIM, ...), need redis, or call out to the network
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never an environment proxy

OFF = (
    "rbl",
    "surbl",
    "spf",
    "dkim",
    "dmarc",
    "arc",
    "asn",
    "mx_check",
    "emails",
    "phishing",
    "fuzzy_check",
    "dcc",
    "greylist",
    "ratelimit",
    "neural",
    "reputation",
    "history_redis",
    "url_redirector",
    "rspamd_update",
    "bimi",
    "metadata_exporter",
    "clickhouse",
    "elastic",
    "replies",
    "external_services",
    "antivirus",
    "dkim_signing",
    "p0f",
    "whitelist",
    "maillist",
    "once_received",
    "hfilter",
    "spamtrap",
    "url_reputation",
    "url_tags",
)

MAIN = """
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(priority=10) "$LOCAL_CONFDIR/options.inc"
}}
logging {{ type = "file"; filename = "$LOGDIR/rspamd.log"; level = "warning"; }}
worker "normal" {{
    bind_socket = "127.0.0.1:{port}";
    count = 1;
    .include "$CONFDIR/worker-normal.inc"
}}
"""
OPTIONS = """
dns {{ nameserver = ["127.0.0.1:{dead_port}"]; timeout = 0.2s; retransmits = 1; }}
local_addrs = [];
enable_test_patterns = true;
# no regexp compilation at start (minutes on a busy machine); PCRE is enough for a test
disable_hyperscan = true;
# the public suffix list takes ~25 s to compile without hyperscan
url_tld = "$LOCAL_CONFDIR/tld.dat";
"""


class Rspamd(PeerProcess):
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def available() -> bool:
        return Path(RSPAMD).is_file()

    def _write_config(self) -> Path:
        local = self.workdir / "local"
        (local / "local.d").mkdir(parents=True, exist_ok=True)
        for sub in ("db", "run"):
            (self.workdir / sub).mkdir(exist_ok=True)
        for module in OFF:
            (local / "local.d" / f"{module}.conf").write_text("enabled = false;\n")
        (local / "local.d" / "milter_headers.conf").write_text(
            "extended_spam_headers = true;\nskip_local = false;\nskip_authenticated = false;\n"
        )
        (local / "tld.dat").write_text("test\ncom\norg\nnet\nexample\n")
        (local / "soft.map").write_text(SOFT_REJECT_SENDER + "\n")
        (local / "local.d" / "multimap.conf").write_text(
            'SOFT_SENDER { type = "from"; filter = "email:addr"; map = "%s"; action = "soft reject"; '
            "prefilter = true; }\n" % (local / "soft.map")
        )
        main = self.workdir / "rspamd.conf"
        main.write_text(MAIN.format(port=self.port))
        (local / "options.inc").write_text(OPTIONS.format(dead_port=free_port()))
        return main

    def start(self, timeout: float = 30.0) -> Rspamd:
        main = self._write_config()
        w = self.workdir
        self.proc = subprocess.Popen(
            [
                RSPAMD,
                "-f",
                "-c",
                str(main),
                "-u",
                "root",
                "-g",
                "root",
                f"--var=LOCAL_CONFDIR={w / 'local'}",
                f"--var=DBDIR={w / 'db'}",
                f"--var=RUNDIR={w / 'run'}",
                f"--var=LOGDIR={w}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(w / "stderr.log", "wb"),  # noqa: SIM115 (the child's)
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rspamd exited: {self.log()[-2000:]}")
            try:
                with _OPENER.open(f"{self.url}/ping", timeout=1) as r:
                    if r.read().strip() == b"pong":
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"rspamd did not answer within {timeout}s: {self.log()[-2000:]}")

    def log(self) -> str:
        parts = [
            p.read_text(errors="replace")
            for p in (self.workdir / "stderr.log", self.workdir / "rspamd.log")
            if p.exists()
        ]
        return "\n".join(parts)
