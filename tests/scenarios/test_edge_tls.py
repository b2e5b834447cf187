"""STARTTLS and SIGHUP against the real `backupmx serve`: TLS 1.2+ only, the TLS version and cipher in
the Received header, a new certificate (scripts/make-test-cert) taken on SIGHUP without a restart (a
broken one refused, the old kept), and recipient files re-read on change and on SIGHUP."""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import time
import warnings
from pathlib import Path

import pytest

from tests.scenarios.test_edge_client import EdgeClient, make_cert, wait_for
from tests.support.serve import ServeProcess, free_port


def tls_client(node: ServeProcess, ctx: ssl.SSLContext | None = None) -> EdgeClient:
    c = EdgeClient(node.port)
    c.send(b"EHLO client.test\r\n")
    lines = c.reply_lines()
    assert any("STARTTLS" in ln for ln in lines), lines
    assert c.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    c.starttls(ctx)
    assert c.cmd("EHLO client.test").startswith("250 ")
    return c


def peer_der(c: EdgeClient) -> bytes:
    assert isinstance(c.sock, ssl.SSLSocket)
    der = c.sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def hup(node: ServeProcess) -> None:
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)


@pytest.fixture
def tls_node(tmp_path: Path) -> ServeProcess:
    cert, key = make_cert(tmp_path / "live")
    return ServeProcess(
        tmp_path / "node",
        domains=[{"name": "ours.test", "primary": [f"127.0.0.1:{free_port()}"], "recipients": "any"}],
        server={"tls_cert": str(cert), "tls_key": str(key)},
    )


def test_starttls_modern_only_and_received_header(tls_node: ServeProcess) -> None:
    with tls_node as node:
        node.start()
        with tls_client(node) as c:
            assert isinstance(c.sock, ssl.SSLSocket)
            version, cipher = c.sock.version(), c.sock.cipher()
            assert version in ("TLSv1.2", "TLSv1.3") and cipher is not None
            replies = c.send_mail(b"Subject: over TLS\r\n\r\nsecret\r\n")
            assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
            qid = replies[-1].rsplit(" ", 1)[1]
        body = node.cli("queue", "show", qid, "--body").stdout  # text mode: line ends read as "\n"
        head = body.split("\n\n", 1)[0]
        tls = rf"\(using {re.escape(version)} with cipher {re.escape(cipher[0])} \({cipher[2]} bits\)\)"
        assert re.search(rf"^Received: from client\.test .*\n\t{tls}\n\tby backup\.test ", head), head
        assert " with ESMTPS id " + qid in head
        # TLS 1.1 and older: refused by the server (the client offers them; the server's alert ends it)
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        with warnings.catch_warnings():  # deprecated on purpose: this is the client a server must refuse
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        try:
            old.set_ciphers("ALL:@SECLEVEL=0")
        except ssl.SSLError:
            pytest.skip("this OpenSSL cannot even offer TLS 1.1")
        c = EdgeClient(node.port)
        c.cmd("EHLO client.test")
        assert c.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)) as info:
            c.starttls(old)
        c.close()
        assert "no protocols available" not in str(info.value)  # it was offered, and refused
        print(f"\nTLS 1.1 client: {info.value}")


def test_sighup_reloads_the_certificate(tls_node: ServeProcess, tmp_path: Path) -> None:
    live = tmp_path / "live"
    with tls_node as node:
        node.start()
        with tls_client(node) as c:
            first = peer_der(c)
        new_cert, new_key = make_cert(tmp_path / "next", name="backup2.test")
        shutil.copy(new_key, live / "key.pem")
        shutil.copy(new_cert, live / "cert.pem")
        with tls_client(node) as c:
            assert peer_der(c) == first  # nothing changes before SIGHUP
        hup(node)
        assert wait_for(lambda: "reloaded recipient lists and TLS certificate" in node.log(), timeout=10)
        with tls_client(node) as c:
            second = peer_der(c)
        assert second != first
        # a broken certificate is refused at SIGHUP; the one in use stays
        (live / "cert.pem").write_text("not a certificate\n")
        hup(node)
        assert wait_for(lambda: "TLS certificate not reloaded" in node.log(), timeout=10)
        with tls_client(node) as c:
            assert peer_der(c) == second
        assert node.alive()


def test_recipient_file_reload_on_change_and_on_sighup(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text("alice\nbob\n")
    node = ServeProcess(
        tmp_path / "node",
        domains=[{"name": "ours.test", "primary": [f"127.0.0.1:{free_port()}"], "recipients": f"file:{users}"}],
    )

    def rcpt(address: str) -> str:
        with EdgeClient(node.port) as c:
            c.cmd("EHLO client.test")
            c.cmd("MAIL FROM:<s@sender.test>")
            return c.cmd(f"RCPT TO:<{address}>")

    with node:
        node.start()
        assert rcpt("alice@ours.test") == "250 2.1.5 Ok"
        assert rcpt("carol@ours.test").startswith("550 5.1.1")
        # a change the file's stat() shows is seen without a signal (looked at once a second)
        users.write_text("alice\nbob\ncarol\n")
        assert wait_for(lambda: rcpt("carol@ours.test") == "250 2.1.5 Ok", timeout=10)
        # an edit that keeps size, inode and mtime is invisible to stat(): SIGHUP re-reads anyway
        st = users.stat()
        with open(users, "r+b") as f:
            f.write(b"alice\nbob\ndave_\n")
        os.utime(users, ns=(st.st_atime_ns, st.st_mtime_ns))
        time.sleep(1.5)
        assert rcpt("dave_@ours.test").startswith("550 5.1.1")
        hup(node)
        assert wait_for(lambda: rcpt("dave_@ours.test") == "250 2.1.5 Ok", timeout=10)
        assert rcpt("carol@ours.test").startswith("550 5.1.1")
        # an unreadable file keeps the last good list
        users.unlink()
        hup(node)
        time.sleep(0.5)
        assert rcpt("dave_@ours.test") == "250 2.1.5 Ok"
        assert node.alive()
