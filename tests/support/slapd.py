"""A private OpenLDAP server from Debian's `slapd` package for tests: slapd.conf in a temporary directory, an
mdb database under `dc=example,dc=test`, a loopback port, a bind DN with a password, and a small schema
that adds Active Directory's `proxyAddresses` (an auxiliary class `mailProxy`). Entries are added and
removed through ldap3 as the directory's administrator. `stop()` ends it; `start()` brings it back with
the same data (the "directory down" case)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.support.peer_process import PeerProcess
from tests.support.ports import free_port

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
BASE = "dc=example,dc=test"
ADMIN = f"cn=admin,{BASE}"
PASSWORD = "directory-secret"

SCHEMA = """
attributetype ( 1.3.6.1.4.1.55555.1.1 NAME 'proxyAddresses'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
objectclass ( 1.3.6.1.4.1.55555.2.1 NAME 'mailProxy' SUP top AUXILIARY MAY proxyAddresses )
"""

CONF = """
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include {schema}
pidfile {dir}/slapd.pid
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 10485760
suffix "{base}"
rootdn "{admin}"
rootpw {password}
directory {dir}/db
access to * by * read
"""


class Slapd(PeerProcess):
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @staticmethod
    def available() -> bool:
        return Path(SLAPD).is_file() and Path("/usr/lib/ldap/back_mdb.so").exists()

    def _write_config(self) -> Path:
        (self.workdir / "db").mkdir(parents=True, exist_ok=True)
        schema = self.workdir / "proxy.schema"
        schema.write_text(SCHEMA)
        conf = self.workdir / "slapd.conf"
        conf.write_text(CONF.format(schema=schema, dir=self.workdir, base=BASE, admin=ADMIN, password=PASSWORD))
        return conf

    def start(self, timeout: float = 20.0) -> Slapd:
        conf = self._write_config()
        # -d 0: stay in the foreground (so the test owns the process) without debug output
        self.proc = subprocess.Popen(
            [SLAPD, "-f", str(conf), "-h", self.url + "/", "-d", "0"],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "slapd.log", "ab"),  # noqa: SIM115 (the child's)
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited: {(self.workdir / 'slapd.log').read_text(errors='replace')}")
            try:
                self.connection().unbind()
                return self
            except Exception:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("slapd did not answer")

    def connection(self):  # type: ignore[no-untyped-def]
        import ldap3

        server = ldap3.Server("127.0.0.1", port=self.port, get_info=ldap3.NONE, connect_timeout=2)
        return ldap3.Connection(server, user=ADMIN, password=PASSWORD, auto_bind=True, raise_exceptions=True)

    def seed(self) -> None:
        conn = self.connection()
        conn.add(BASE, ["dcObject", "organization"], {"o": "Example", "dc": "example"})
        conn.add(f"ou=people,{BASE}", ["organizationalUnit"], {"ou": "people"})
        conn.unbind()

    def add_user(self, uid: str, mail: str | None = None, proxy: list[str] | None = None) -> None:
        attrs: dict[str, object] = {"cn": uid, "sn": uid}
        classes = ["inetOrgPerson"]
        if mail:
            attrs["mail"] = mail
        if proxy:
            attrs["proxyAddresses"] = proxy
            classes.append("mailProxy")
        conn = self.connection()
        conn.add(f"uid={uid},ou=people,{BASE}", classes, attrs)
        conn.unbind()

    def remove_user(self, uid: str) -> None:
        conn = self.connection()
        conn.delete(f"uid={uid},ou=people,{BASE}")
        conn.unbind()
