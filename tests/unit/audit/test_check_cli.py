"""`backupmx check` as a command: text and JSON output, exit codes, usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from backupmx.cli import main
from tests.unit.audit.lab import Lab, Pki, two_mx, worst_lab


def healthy_lab(pki: Pki, tls: str = "ca") -> Lab:
    lab = Lab(pki, two_mx("cli.test"))
    lab.mx("mx1.cli.test", "127.1.0.1", domains={"cli.test"})
    lab.mx("mx2.cli.test", "127.2.0.1", domains={"cli.test"}, tls=tls)
    return lab


def test_text_output_and_exit_zero(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    with healthy_lab(pki) as lab:
        code = main(lab.cli_args("cli.test"))
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("backupmx check cli.test  (")
    assert "  [ ok ] smtp.relay" in out and "[WARN]" not in out and "[FAIL]" not in out
    assert out.rstrip().endswith("exit 0")
    lab.assert_clean_sessions()


def test_json_output_and_exit_one_on_failures(pki: Pki, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    # recipients = "verify": the default "any" adds a node.recipients warning (backscatter)
    cfg.write_text('[server]\nhostname = "mx2.worst.test"\n\n[[domains]]\nname = "worst.test"\nrecipients = "verify"\n')
    with worst_lab(pki) as lab:
        code = main([*lab.cli_args("worst.test"), "--json", "--config", str(cfg)])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["exit_code"] == 1 and doc["result"] == "fail"
    assert doc["node"] == "mx2.worst.test" and doc["config"] == str(cfg)
    assert {(m["check"], m["level"]) for m in doc["marks"] if m["level"] == "fail"} == {
        ("site.backup", "fail"),
        ("site.prefix", "fail"),
        ("sts.mx-match", "fail"),
        ("sts.cert", "fail"),
        ("dane.tlsa", "fail"),
        ("smtp.starttls", "fail"),
        ("smtp.relay", "fail"),
    }
    assert doc["mta_sts"]["policy"] == {"mode": "enforce", "mx": ["mx1.worst.test"], "max_age": 3600}
    assert doc["tlsa"][0]["host"] == "mx1.worst.test" and doc["tlsa"][0]["secure"] is True
    assert doc["asn"]["source"].startswith("file ")
    assert [m["level"] for m in doc["marks"] if m["check"].startswith("node.")] == ["ok", "ok"]
    assert [(r["preference"], r["host"], r["role"]) for r in doc["dns"]["mx"]] == [
        (10, "mx1.worst.test", "primary"),
        (20, "mx2.worst.test", "backup"),
    ]
    assert doc["dns"]["mx"][0]["addresses"] == [{"address": "127.1.0.1", "ttl": 300}]
    primary = next(p for p in doc["smtp"] if p["host"] == "mx1.worst.test")
    assert primary["tls"]["cert"]["subject"] == "CN=mx1.worst.test" and primary["tls"]["verified"] is True
    assert primary["transcript"][-2:] == ["C: QUIT", "S: 221 2.0.0 Bye"]
    levels = ("ok", "info", "warn", "fail")
    assert doc["summary"] == {lv: sum(1 for m in doc["marks"] if m["level"] == lv) for lv in levels}


def test_strict_fails_on_warnings(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    with healthy_lab(pki, tls="self-signed") as lab:
        assert main(lab.cli_args("cli.test")) == 0
        assert main([*lab.cli_args("cli.test"), "--strict"]) == 1
    assert "[WARN] smtp.tls-cert" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check", "cli.test", "--nameserver", "not-an-ip"], "nameserver"),
        (["check", "not a domain", "--nameserver", "127.0.0.1:1"], "not a domain name"),
        (["check", "cli.test", "--cafile", "/nonexistent/ca.pem"], "no such file"),
        (["check", "cli.test", "--config", "/nonexistent/backupmx.toml"], "no such file"),
        (
            ["check", "cli.test", "--nameserver", "127.0.0.1:1", "--asn-db", "/nonexistent/asn.dat"],
            "--asn-db /nonexistent/asn.dat: No such file",
        ),
    ],
)
def test_usage_errors_exit_two(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad", [["--port", "0"], ["--port", "x"], ["--timeout", "0"], ["--timeout", "9999"], ["--asn-lookup", "whois"]]
)
def test_bad_port_or_timeout(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["check", "cli.test", *bad])
    assert e.value.code == 2


def test_the_installed_command(pki: Pki) -> None:
    """The real entry point in a fresh process, against the lab in this one."""
    with worst_lab(pki) as lab:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from backupmx.cli import main; sys.exit(main())",
                *lab.cli_args("worst.test"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert "[FAIL] smtp.relay" in done.stdout and "open relay" in done.stdout
    assert done.stdout.rstrip().endswith("exit 1")
