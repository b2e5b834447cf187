"""Who may use the admin listener: one shared token, presented as `Authorization: Bearer TOKEN` (API,
scripts, Prometheus off loopback) or exchanged once on the login form for a session cookie (dashboard).

- The token comes from `[admin] token_file`; without one, a random token is generated once into
  `data_dir/admin.token` (mode 0600), so the admin side is never open, even on loopback.
- A non-loopback listener needs an explicit `token_file` (ConfigError otherwise).
- Session cookies are HMAC-signed (key derived from the token: changing the token logs everyone out),
  HttpOnly, SameSite=Strict, expire after 12 h. Each form carries a CSRF token bound to the session.
Comparisons are constant-time. Nothing here logs a token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from pathlib import Path

from backupmx.config import Config, is_loopback, parse_hostport
from backupmx.errors import ConfigError
from backupmx.privatefiles import ADMIN_TOKEN_FILE, write_secret

log = logging.getLogger("backupmx.admin")

COOKIE = "backupmx_session"
SESSION_SECONDS = 12 * 3600
MIN_TOKEN_CHARS = 16
GENERATED_TOKEN_FILE = ADMIN_TOKEN_FILE


def listen_address(config: Config) -> tuple[str, int]:
    """The admin listener's (host, port), refusing a non-loopback one without a token file."""
    listen = config.admin.listen
    if not listen:
        raise ConfigError(f"{config.source}: admin.listen: empty: the admin listener is off")
    try:
        host, port = parse_hostport(listen, default_port=8025)
    except ValueError:
        raise ConfigError(f"{config.source}: admin.listen: {listen!r} is not host:port") from None
    if not is_loopback(host) and config.admin.token_file is None:
        raise ConfigError(
            f"{config.source}: admin.listen: {listen} is not a loopback address; "
            "set admin.token_file before listening there"
        )
    return host, port


def load_token(config: Config) -> str:
    """The admin token: `admin.token_file`, or one generated once into `data_dir/admin.token`."""
    path = config.admin.token_file
    if path is not None:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"{config.source}: admin.token_file: cannot read {path}: {e.strerror}") from None
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(
                f"{config.source}: admin.token_file: the token in {path} must be at least {MIN_TOKEN_CHARS} characters"
            )
        if path.stat().st_mode & 0o077:
            log.warning("%s: readable by group or others; chmod 600 it", path)
        return token
    return _generated_token(config.server.data_dir / GENERATED_TOKEN_FILE)


def _generated_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
        if len(token) >= MIN_TOKEN_CHARS:
            return token
        short = True
    except FileNotFoundError:
        short = False
    token = secrets.token_urlsafe(32)
    # 0600 through an O_EXCL|O_NOFOLLOW temporary file; a token another process wrote first wins
    written = write_secret(path, (token + "\n").encode(), replace=short).decode("utf-8", "replace").strip()
    if written == token:
        log.warning("admin token generated in %s (set admin.token_file to choose one)", path)
    return written


class AdminAuth:
    def __init__(self, token: str, *, session_seconds: float = SESSION_SECONDS) -> None:
        self._token = token.encode()
        self._key = hashlib.sha256(b"backupmx admin session\0" + self._token).digest()
        self.session_seconds = session_seconds
        self._revoked: dict[str, float] = {}  # nonce -> expiry, for logout

    def token_ok(self, presented: str | None) -> bool:
        if not presented:
            return False
        return hmac.compare_digest(presented.strip().encode(), self._token)

    def bearer_ok(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value)

    def _mac(self, message: str) -> str:
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()

    def new_session(self, now: float | None = None) -> str:
        expires = int((now or time.time()) + self.session_seconds)
        nonce = secrets.token_urlsafe(16)
        return f"{expires}.{nonce}.{self._mac(f'session.{expires}.{nonce}')}"

    def session_nonce(self, cookie: str | None, now: float | None = None) -> str | None:
        """The session's nonce when the cookie is genuine, unexpired and not logged out."""
        if not cookie:
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        expires, nonce, mac = parts
        if not hmac.compare_digest(mac, self._mac(f"session.{expires}.{nonce}")):
            return None
        if int(expires) < (now or time.time()) or nonce in self._revoked:
            return None
        return nonce

    def csrf_token(self, nonce: str) -> str:
        return self._mac(f"csrf.{nonce}")[:40]

    def csrf_ok(self, nonce: str, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(str(presented), self.csrf_token(nonce))

    def revoke(self, cookie: str | None, now: float | None = None) -> None:
        nonce = self.session_nonce(cookie, now)
        if nonce is None or cookie is None:
            return
        t = now or time.time()
        self._revoked = {n: e for n, e in self._revoked.items() if e > t}  # bounded by live sessions
        self._revoked[nonce] = float(cookie.split(".")[0])
