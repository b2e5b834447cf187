"""What the two web listeners (admin/api.py, continuity/inbox.py) do alike: bind an aiohttp app and read
back the address it got, put the security headers on each response, and tell a cross-origin browser
request. It holds no routes, no authentication and no header values of its own: each listener passes its
own. A failed bind raises the OSError after the runner is cleaned up.
"""

from __future__ import annotations

from collections.abc import Mapping
from ssl import SSLContext

from aiohttp import web


async def start_site(app: web.Application, host: str, port: int, *, ssl_context: SSLContext | None = None
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


def same_origin(request: web.Request) -> bool:
    """Browsers send Origin on cross-site POSTs: no Origin is ours; "null", an empty one or another host is
    not (SameSite=Strict on the session cookies is the other guard)."""
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return origin is None
    return origin.split("://", 1)[-1].rstrip("/") == request.host
