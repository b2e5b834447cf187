"""Addresses of a domain among LDAP attribute values (mail, Active Directory's proxyAddresses)."""

from __future__ import annotations

from backupmx.config import config_from_dict
from backupmx.errors import ConfigError
from backupmx.policy.ldap import addresses_from


def test_addresses_from_values() -> None:
    values = [
        "Alice@Example.Test",
        "SMTP:Bob@example.test",
        "smtp:robert@EXAMPLE.test",
        "X500:/o=x/cn=bob",
        "sip:bob@example.test",
        "smtp:bob@elsewhere.test",
        "not an address",
        "",
        "smtp:",
        "@example.test",
    ]
    assert addresses_from(values, "example.test") == {"alice@example.test", "bob@example.test", "robert@example.test"}


def test_ldap_recipients_need_a_base() -> None:
    cfg = config_from_dict({"domains": [{"name": "a.test", "recipients": "ldaps://dir.a.test", "ldap_base": "dc=a"}]})
    assert cfg.domains[0].ldap_url == "ldaps://dir.a.test"
    try:
        config_from_dict({"domains": [{"name": "a.test", "recipients": "ldap://dir.a.test"}]}, "x.toml")
    except ConfigError as e:
        assert "x.toml: domains[0](a.test): " in str(e) and "ldap_base" in str(e)
    else:
        raise AssertionError("no ConfigError")
