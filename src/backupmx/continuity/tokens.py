"""Signing for the emergency inbox: the per-installation secret, one-time sign-in links, the
unguessable per-(message, identity) URL tokens, and CSRF tokens bound to a session.

The secret is 32 random bytes in `data_dir/continuity.key` (or `[continuity] secret_file`), created once
with mode 0600; every key used here is derived from it, one per purpose. A link carries its own expiry
and a random ID; that it is used only once is the store's business (grants.py), not this module's.
Nothing here logs a token; comparisons are constant-time. Bad input is refused with `LinkRefused`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from backupmx.privatefiles import CONTINUITY_KEY_FILE, write_secret

log = logging.getLogger("backupmx.continuity")

SECRET_FILE = CONTINUITY_KEY_FILE
SECRET_BYTES = 32
LINK_PREFIX = "v1"


def normalize_address(address: str) -> str:
    """The identity of a mailbox: trimmed and lower-cased (mailboxes are case-insensitive in practice)."""
    return address.strip().strip("<>").strip().lower()


def load_secret(path: Path) -> bytes:
    """The installation's secret, created (0600) on first use. A file that is too short is an error,
    never silently replaced: replacing it would invalidate every link and session."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        fresh = secrets.token_bytes(SECRET_BYTES)
        # 0600 through an O_EXCL|O_NOFOLLOW temporary file, linked into place: a half-written key is
        # never seen, and of two processes creating it at once both end up with the first one's
        data = write_secret(path, fresh)
        if data == fresh:
            log.info("continuity: signing secret created in %s", path)
    if len(data) < SECRET_BYTES:
        raise ValueError(f"{path}: the continuity secret must hold at least {SECRET_BYTES} bytes")
    if path.stat().st_mode & 0o077:
        log.warning("%s: readable by group or others; chmod 600 it", path)
    return data


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Refusal(StrEnum):
    """Why a sign-in link was not accepted (shown to the person, in their language, and audited)."""

    INVALID = "invalid"  # damaged, forged, or signed with another secret
    EXPIRED = "expired"
    USED = "used"  # already exchanged for a session (once only)
    REVOKED = "revoked"  # the grant behind it was revoked, replaced or has ended
    CLOSED = "closed"  # the inbox of that domain is not open


class LinkRefused(Exception):
    def __init__(self, reason: Refusal, address: str | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.address = address


@dataclass(frozen=True, slots=True)
class LinkClaims:
    link_id: str  # random, unique: what makes a link single-use
    address: str  # the identity the link signs in as
    grant_id: str  # the grant that allowed it (a revoked or replaced grant kills its links)
    expires_at: float


class Signer:
    """Every MAC of the emergency inbox, each with its own key derived from the installation secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < SECRET_BYTES:
            raise ValueError("the continuity secret is too short")
        self._link_key = self._derive(secret, b"link")
        self._message_key = self._derive(secret, b"message")
        self._csrf_key = self._derive(secret, b"csrf")

    @staticmethod
    def _derive(secret: bytes, purpose: bytes) -> bytes:
        return hmac.new(secret, b"backupmx continuity\0" + purpose, hashlib.sha256).digest()

    # -- sign-in links ---------------------------------------------------------------------------
    def sign_link(self, claims: LinkClaims) -> str:
        payload = json.dumps(
            {"i": claims.link_id, "a": claims.address, "g": claims.grant_id, "e": int(claims.expires_at)},
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        body = _b64(payload)
        mac = hmac.new(self._link_key, f"{LINK_PREFIX}.{body}".encode(), hashlib.sha256).digest()
        return f"{LINK_PREFIX}.{body}.{_b64(mac)}"

    def verify_link(self, token: str, *, now: float) -> LinkClaims:
        """The claims of a genuine, unexpired link; raises LinkRefused(INVALID | EXPIRED)."""
        parts = (token or "").strip().split(".")
        if len(parts) != 3 or parts[0] != LINK_PREFIX or len(token) > 2048:
            raise LinkRefused(Refusal.INVALID)
        try:
            mac = _unb64(parts[2])
            expected = hmac.new(self._link_key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(mac, expected):
                raise LinkRefused(Refusal.INVALID)
            data = json.loads(_unb64(parts[1]))
            claims = LinkClaims(
                link_id=str(data["i"]), address=str(data["a"]), grant_id=str(data["g"]), expires_at=float(data["e"])
            )
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise LinkRefused(Refusal.INVALID) from None
        if claims.expires_at <= now:
            raise LinkRefused(Refusal.EXPIRED, claims.address)
        return claims

    # -- message URLs ----------------------------------------------------------------------------
    def message_token(self, queue_id: str, address: str) -> str:
        """22 characters that only this installation can compute for (message, identity): a URL to
        someone else's message cannot be made by changing the queue ID, which is time-based."""
        mac = hmac.new(self._message_key, f"{queue_id}\0{normalize_address(address)}".encode(), hashlib.sha256)
        return _b64(mac.digest()[:16])

    def message_token_ok(self, queue_id: str, address: str, presented: str) -> bool:
        return hmac.compare_digest(
            self.message_token(queue_id, address).encode(), (presented or "").encode("ascii", "replace")
        )

    # -- forms -----------------------------------------------------------------------------------
    def csrf_token(self, session_key: str) -> str:
        return _b64(hmac.new(self._csrf_key, session_key.encode(), hashlib.sha256).digest()[:18])

    def csrf_ok(self, session_key: str, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(
            self.csrf_token(session_key).encode(), str(presented).encode("ascii", "replace")
        )


def new_id(nbytes: int = 16) -> str:
    return _b64(secrets.token_bytes(nbytes))


def session_key(session_id: str) -> str:
    """What the store keeps for a session cookie: its hash, so a copy of the database signs nobody in."""
    return hashlib.sha256(b"backupmx continuity session\0" + session_id.encode()).hexdigest()
