"""Config: the contract keys parse, units work, and every error names the file and the key."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from backupmx.config import config_from_dict, load_config, parse_duration, parse_hostport, parse_size
from backupmx.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1),
        ("5m", 300),
        ("2h", 7200),
        ("30d", 2_592_000),
        ("1h30m", 5400),
        ("1w", 604800),
        (90, 90),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("bad", ["", "5", "5x", "m5", "1s2", "-1s", True, None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "n"), [("50MB", 50_000_000), ("512KiB", 524288), ("10", 10), ("1g", 10**9)])
def test_sizes(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize(
    ("text", "hp"),
    [
        ("mx1.example.com:25", ("mx1.example.com", 25)),
        ("[::1]:2525", ("::1", 2525)),
        ("127.0.0.1", ("127.0.0.1", 25)),
        ("[::]", ("::", 25)),
    ],
)
def test_hostport(text: str, hp: tuple[str, int]) -> None:
    assert parse_hostport(text) == hp


def test_contract_keys_from_the_readme() -> None:
    cfg = config_from_dict(
        {
            "server": {
                "hostname": "backup.example.net",
                "listen": ["0.0.0.0:25", "[::]:25"],
                "data_dir": "/var/lib/backupmx",
                "max_message_size": "50MB",
            },
            "domains": [
                {"name": "Example.COM.", "primary": ["mx1.example.com:25"], "recipients": "any"},
                {"name": "b.example", "primary": ["mx"], "recipients": ["alice@b.example"]},
                {"name": "c.example", "recipients": "file:/etc/backupmx/c.txt"},
            ],
            "delivery": {"retry_min": "1m", "retry_max": "1h", "retention": "30d", "probe_interval": "30s"},
        }
    )
    assert cfg.server.max_message_size == 50_000_000
    assert cfg.domain("EXAMPLE.com") is not None
    d = cfg.domains[0]
    assert d.name == "example.com" and d.primary_hosts == [("mx1.example.com", 25)]
    assert cfg.domains[1].primary_hosts is None and cfg.domains[1].recipients == ("alice@b.example",)
    assert cfg.delivery.retention == timedelta(days=30) and cfg.delivery.retention_cap == timedelta(days=90)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"delivery": {"retry_min": "0s"}}, "f.toml: delivery.retry_min: must be at least 1s"),
        ({"delivery": {"retry_min": "2h", "retry_max": "1h"}}, "f.toml: delivery.retry_max: must not be shorter"),
        ({"server": {"lisen": ["x"]}}, "f.toml: server.lisen: unknown key"),
        ({"domains": [{"name": "a.test", "primary": ["a:b"]}]}, "domains[0](a.test).primary: 'a:b' is not host:port"),
        ({"domains": [{"name": "a.test", "recipients": "all"}]}, "f.toml: domains[0](a.test).recipients: must be"),
        ({"domains": [{"name": "a.test"}, {"name": "A.test"}]}, "f.toml: domains: a.test is listed twice"),
        ({"server": {"max_message_size": "lots"}}, "f.toml: server.max_message_size: 'lots' is not a size"),
    ],
)
def test_errors_name_file_and_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, source="f.toml")
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("section", "key", "message"),
    [
        ("filter", "rspamd", 'must be an http:// address such as "http://127.0.0.1:11333"'),
        ("continuity", "base_url", "must be an http:// or https:// address such as https://mail-backup.example.com"),
    ],
)
def test_http_url_keys(section: str, key: str, message: str) -> None:
    """Both http(s) address keys trim the trailing slash and keep their own message for a bad one."""
    cfg = config_from_dict({section: {key: " https://h.test:8/x/ "}})
    assert getattr(getattr(cfg, section), key) == "https://h.test:8/x"
    for bad in ("ftp://h.test", "http://", "http://h.test/a b", "h.test"):
        with pytest.raises(ConfigError) as e:
            config_from_dict({section: {key: bad}}, source="f.toml")
        assert f"f.toml: {section}.{key}: {message}" in str(e.value)


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nhostname=1")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(bad)


def test_quickstart_example_is_valid() -> None:
    cfg = load_config(REPO / "examples" / "quickstart.toml")
    assert cfg.domains[0].name == "example.test"


def test_config_check_cli(tmp_path: Path) -> None:
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "backupmx.cli",
            "config",
            "check",
            "--config",
            str(REPO / "examples" / "quickstart.toml"),
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "ok (1 domain(s): example.test)" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[delivery]\nretry_min = "soon"\n')
    res = subprocess.run(
        [sys.executable, "-m", "backupmx.cli", "config", "check", "--config", str(bad)], capture_output=True, text=True
    )
    assert res.returncode == 2
    assert f"{bad}: delivery.retry_min:" in res.stderr and "Traceback" not in res.stderr
