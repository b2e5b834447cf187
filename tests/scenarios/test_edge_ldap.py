"""Recipients from a real OpenLDAP (Debian's slapd, started on loopback by tests/support/slapd.py) on a real
`backupmx serve`: `mail` and `proxyAddresses` (smtp:/SMTP:) of the domain are accepted and everyone else
gets 550 5.1.1; an address added to or removed from the directory is accepted or refused after the next
sync; with the directory down the last set stays in use (frozen), `status` and `/metrics` say so, and it
survives a restart of serve."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scenarios.test_edge_client import EdgeClient, wait_for
from tests.support.ports import free_port
from tests.support.serve import ServeProcess
from tests.support.slapd import ADMIN, BASE, PASSWORD, Slapd

pytest.importorskip("ldap3")
pytestmark = pytest.mark.skipif(not Slapd.available(), reason="needs Debian's slapd (/usr/sbin/slapd)")

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never an environment proxy


def rcpt(node: ServeProcess, address: str) -> str:
    with EdgeClient(node.port, source="127.0.0.2") as c:
        assert c.cmd("EHLO client.test").startswith("250")
        assert c.cmd("MAIL FROM:<s@sender.test>").startswith("250")
        return c.cmd(f"RCPT TO:<{address}>")


def metrics(node: ServeProcess) -> str:
    with _OPENER.open(f"http://127.0.0.1:{node.admin_port}/metrics", timeout=10) as r:
        return str(r.read().decode())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, Slapd]]:
    tmp = tmp_path_factory.mktemp("edge_ldap")
    with Slapd(tmp / "slapd") as slapd:
        slapd.seed()
        slapd.add_user("alice", mail="Alice@example.test")
        slapd.add_user(
            "bob",
            proxy=[
                "SMTP:bob@example.test",
                "smtp:robert@example.test",
                "X500:/o=Example/cn=bob",
                "smtp:bob@elsewhere.test",
            ],
        )
        password = tmp / "ldap.secret"
        password.write_text(PASSWORD + "\n")
        node = ServeProcess(
            tmp / "node",
            admin=True,
            domains=[
                {
                    "name": "example.test",
                    "primary": [f"127.0.0.1:{free_port()}"],
                    "recipients": slapd.url,
                    "ldap_base": f"ou=people,{BASE}",
                    "ldap_bind_dn": ADMIN,
                    "ldap_password_file": str(password),
                    "ldap_interval": "1s",
                    "ldap_timeout": "2s",
                }
            ],
            extra={"dns": {"nameservers": [f"127.0.0.1:{free_port()}"], "timeout": "1s"}},
        )
        with node:
            node.start()
            yield node, slapd


def test_directory_add_remove_and_down(world: tuple[ServeProcess, Slapd]) -> None:
    node, slapd = world
    # before the first sync the default unknown_while_down = "accept" holds; after it, strangers get 550
    assert wait_for(lambda: rcpt(node, "nobody@example.test").startswith("550"), timeout=20), node.log()[-3000:]
    assert rcpt(node, "alice@example.test").startswith("250")
    assert rcpt(node, "ALICE@example.test").startswith("250")
    assert rcpt(node, "robert@example.test").startswith("250")  # smtp: proxy address
    assert rcpt(node, "bob@example.test").startswith("250")  # SMTP: (primary) proxy address
    assert (
        rcpt(node, "nobody@example.test") == "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"
    )

    slapd.add_user("carol", mail="carol@example.test")
    slapd.remove_user("alice")
    assert wait_for(lambda: rcpt(node, "carol@example.test").startswith("250"), timeout=15)
    assert wait_for(lambda: rcpt(node, "alice@example.test").startswith("550 5.1.1"), timeout=15)
    listed = json.loads(node.cli("recipients", "list", "--json").stdout)["domains"]["example.test"]
    assert listed["recipients"] == "ldap" and sorted(listed["entries"]) == [
        "bob@example.test",
        "carol@example.test",
        "robert@example.test",
    ]
    assert 'backupmx_ldap_recipients{domain="example.test"} 3.0' in metrics(node)

    slapd.stop()  # the directory is down: the last set stays in use
    assert wait_for(lambda: 'backupmx_ldap_sync_ok{domain="example.test"} 0.0' in metrics(node), timeout=15)
    status = json.loads(node.cli("status", "--json").stdout)
    ldap = next(d for d in status["domains"] if d["domain"] == "example.test")["ldap"]
    assert ldap["count"] == 3 and ldap["synced_at"] and "LDAPSocketOpenError" in (ldap["error"] or "")
    assert "failed, the last synced set is kept" in node.cli("status").stdout
    assert rcpt(node, "carol@example.test").startswith("250")
    assert rcpt(node, "nobody@example.test").startswith("550 5.1.1")

    node.terminate()  # and after a restart, still with the directory down, from the spool's kv
    node.start()
    assert rcpt(node, "bob@example.test").startswith("250")
    assert rcpt(node, "alice@example.test").startswith("550 5.1.1")


def test_never_synced_follows_unknown_while_down(tmp_path: Path) -> None:
    node = ServeProcess(
        tmp_path / "node",
        domains=[
            {
                "name": "example.test",
                "primary": [f"127.0.0.1:{free_port()}"],
                "recipients": f"ldap://127.0.0.1:{free_port()}",
                "ldap_base": BASE,
                "ldap_interval": "1s",
                "unknown_while_down": "defer",
            }
        ],
        extra={"dns": {"nameservers": [f"127.0.0.1:{free_port()}"], "timeout": "1s"}},
    )
    with node:
        node.start()
        assert rcpt(node, "anyone@example.test") == (
            "450 4.1.1 <anyone@example.test>: Recipient address rejected: unverified address"
        )
        assert rcpt(node, "postmaster@example.test").startswith("250")
