"""What the two web listeners (admin/api.py, continuity/inbox.py) do alike: bind an aiohttp app and read
back the address it got, put the security headers on each response, tell a cross-origin browser request
(scheme, host and port compared), and keep a redirect target on this site. It holds no routes, no
authentication and no header values of its own: each listener passes its own. A failed bind raises the
OSError after the runner is cleaned up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from ssl import SSLContext
from urllib.parse import quote, urlsplit

from aiohttp import web
from yarl import URL

# Control characters (browsers drop tab and newline from URLs, so "/\t/evil" becomes "//evil"), spaces
# and backslashes (read as "/" by browsers): a target holding any of them is refused, not repaired.
_NOT_IN_PATH = re.compile(r"[\x00-\x20\x7f\\]")
MAX_TARGET = 2048


async def start_site(
    app: web.Application, host: str, port: int, *, ssl_context: SSLContext | None = None
) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve `app` on host:port; the runner (to clean up) and the address bound (port 0 becomes real)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    server = site._server  # aiohttp exposes the bound sockets only here
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname() if sockets else (host, port)
    return runner, (str(bound[0]), int(bound[1]))


def site_url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def set_security_headers(request: web.Request, resp: web.StreamResponse, headers: Mapping[str, str]) -> None:
    """`headers` where the handler set none of its own; and no caching of anything but /static/."""
    for k, v in headers.items():
        resp.headers.setdefault(k, v)
    if not request.path.startswith("/static/"):
        resp.headers.setdefault("Cache-Control", "no-store")


def same_site_path(target: str | None, default: str = "/") -> str:
    """`target` when it is a path on this site ("/queue?state=held"), else `default`. Refused: anything
    with a scheme or a host ("//evil", "https:x"), control characters, spaces or backslashes anywhere
    ("/\\t/evil", "/\\\\evil"), "." or ".." segments, and overlong targets. What is kept is re-quoted, so
    the Location header carries no raw byte a browser could read differently."""
    if not target or len(target) > MAX_TARGET or not target.startswith("/") or target.startswith("//"):
        return default
    if _NOT_IN_PATH.search(target):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or parts.fragment or not parts.path.startswith("/"):
        return default
    if any(seg in (".", "..") for seg in parts.path.split("/")):
        return default
    path = quote(parts.path, safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="/?%:@!$&'()*+,;=-._~")
    if path.startswith("//"):
        return default
    return path + ("?" + query if query else "")


def _origin(url: str) -> tuple[str, str, int] | None:
    try:
        u = URL(url)
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.host or u.port is None:
        return None
    return u.scheme, u.host.lower().rstrip("."), u.port


def same_origin(request: web.Request, *, also: Iterable[str] = ()) -> bool:
    """Browsers send Origin on cross-site POSTs: no Origin is ours; "null", an empty or damaged one, or one
    whose scheme, host or port differs from this request's (or from the `also` URLs: a public address
    behind a proxy) is not. SameSite=Strict on the session cookies is the other guard."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    seen = _origin(origin.strip())
    if seen is None:
        return False
    scheme = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip().lower()
    allowed = {_origin(f"{scheme}://{request.host}"), *(_origin(u) for u in also)}
    return seen in allowed
