"""The emergency inbox in a real headless Chromium against the real `backupmx serve` (SQLite spool,
health monitor, SMTP listener) whose primary is down, so an outage is declared and the inbox opens.
Grants and links come from the real CLI (`backupmx access grant`), written to the spool that `serve`
reads. Alice signs in with her link, sees her held mail, reads a plain-text, an HTML and a multipart
message, downloads an attachment and the .eml; a hostile HTML message runs no script and reaches no
other host (every request of the browser is recorded, and so is every hit on a loopback server the
message points at); a link works once and not after it expires; Alice cannot open Bob's message."""

from __future__ import annotations

import asyncio
import contextlib
import json
import smtplib
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.chromium import launched_chromium, needs_chromium
from tests.support.serve import ServeProcess, free_port
from tests.unit.continuity import mail

pytestmark = needs_chromium


class Recorder:
    """A loopback HTTP server the hostile message points at: any hit means something leaked."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(f"GET {self.path}")
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(mail.PNG)

            def do_POST(self) -> None:
                hits.append(f"POST {self.path}")
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(port: int, rcpts: Sequence[str], body: bytes, sender: str = "sender@else.test") -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        c.mail(sender)
        for r in rcpts:
            code, msg = c.rcpt(r)
            assert code == 250, msg
        code, msg = c.data(body)
        assert code == 250, msg
        return msg.decode().rsplit(" ", 1)[-1]


def wait_open(node: ServeProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = json.loads(node.cli("continuity", "status", "--json").stdout)
        if all(d["open"] for d in doc["domains"]):
            return
        time.sleep(0.3)
    raise AssertionError(f"the inbox did not open (no outage declared):\n{node.log()}")


def link_for(node: ServeProcess, address: str, *extra: str) -> str:
    out = node.cli("access", "grant", address, *extra).stdout
    return next(line for line in out.splitlines() if "/signin?t=" in line)


@dataclass
class World:
    node: ServeProcess
    url: str
    recorder: Recorder
    ids: dict[str, str] = field(default_factory=dict)
    bodies: dict[str, bytes] = field(default_factory=dict)

    def send(self, key: str, rcpts: Sequence[str], body: bytes) -> None:
        self.ids[key] = send(self.node.port, rcpts, body)
        self.bodies[key] = body


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("continuity")
    inbox_port = free_port()
    dead_primary = free_port()  # nothing listens there: the outage is declared after two probes
    with (
        Recorder() as recorder,
        ServeProcess(
            tmp,
            domains=[{"name": "example.test", "primary": [f"127.0.0.1:{dead_primary}"], "recipients": "any"}],
            delivery={"down_after": 2, "probe_timeout": "1s", "connect_timeout": "1s"},
            extra={"continuity": {"enabled": True, "listen": f"127.0.0.1:{inbox_port}", "timezone": "Asia/Seoul"}},
        ) as node,
    ):
        node.start()
        w = World(node, f"http://127.0.0.1:{inbox_port}", recorder)
        w.send("plain", ["alice@example.test"], mail.plain())
        w.send("html", ["alice@example.test"], mail.html())
        w.send("multipart", ["alice@example.test"], mail.multipart())
        w.send("hostile", ["alice@example.test"], mail.hostile(recorder.origin))
        w.send("korean", ["alice@example.test"], mail.korean())
        w.send(
            "bob",
            ["bob@example.test"],
            mail.plain(to="bob@example.test", subject="Bob's payslip", text="Bob's salary details.\n"),
        )
        wait_open(node)
        yield w


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with launched_chromium() as b:
        yield b


@dataclass
class Watch:
    """Every request and dialog of one browser context."""

    requests: list[str] = field(default_factory=list)  # every request the page made or tried
    finished: list[str] = field(default_factory=list)  # ... that got an answer
    failed: list[tuple[str, str]] = field(default_factory=list)  # ... that did not, and why ("csp": never sent)
    dialogs: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    _tasks: set[asyncio.Future[Any]] = field(default_factory=set)

    @staticmethod
    def _foreign(urls: list[str], origin: str) -> list[str]:
        return [u for u in urls if not u.startswith(origin + "/") and u not in ("about:blank", "about:srcdoc")]

    def foreign(self, origin: str) -> list[str]:
        """Requests to anything but the inbox itself, even tried ones."""
        return self._foreign(self.requests, origin)

    def left(self, origin: str) -> list[str]:
        """Requests to another origin that the browser did not refuse before sending."""
        refused = {u for u, why in self.failed if why == "csp"}
        return [u for u in self.foreign(origin) if u not in refused] + self._foreign(self.finished, origin)


async def context(browser: Any, *, width: int = 1280, height: int = 900, **kw: Any) -> tuple[Any, Watch]:
    ctx = await browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True, **kw)
    watch = Watch()
    ctx.on("request", lambda req: watch.requests.append(req.url))
    ctx.on("requestfinished", lambda req: watch.finished.append(req.url))
    ctx.on("requestfailed", lambda req: watch.failed.append((req.url, req.failure or "")))

    def on_page(page: Any) -> None:
        page.set_default_timeout(15_000)

        def on_dialog(d: Any) -> None:
            watch.dialogs.append(d.message)
            task = asyncio.ensure_future(d.dismiss())
            watch._tasks.add(task)
            task.add_done_callback(watch._tasks.discard)

        page.on("dialog", on_dialog)
        page.on("console", lambda m: watch.console.append(m.text))

    ctx.on("page", on_page)
    return ctx, watch


async def sign_in(page: Any, link: str) -> None:
    await page.goto(link)
    await page.click("#signin")
    await page.wait_for_selector("ol.messages")


async def test_alice_signs_in_and_reads_plain_html_and_multipart_mail(
    world: World, browser: Any, tmp_path: Path
) -> None:
    ctx, watch = await context(browser)
    page = await ctx.new_page()
    link = link_for(world.node, "alice@example.test")
    await page.goto(link)
    assert "This link signs you in as alice@example.test" in await page.inner_text("main")
    await page.click("#signin")
    await page.wait_for_selector("ol.messages")
    cookie = next(c for c in await ctx.cookies() if c["name"] == "backupmx_inbox")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert "mail service of example.test is down" in await page.inner_text("#outage-banner")
    assert "will also arrive in your normal mailbox" in await page.inner_text("#outage-banner")
    assert await page.inner_text("#held-count") == "5 messages"
    rows = await page.locator("ol.messages li").evaluate_all("els => els.map(e => e.id.slice(2))")
    assert rows == [world.ids[k] for k in ("korean", "hostile", "multipart", "html", "plain")]  # newest first
    assert world.ids["bob"] not in rows and "Bob's payslip" not in await page.inner_text("main")

    # plain text
    await page.click(f"#m-{world.ids['plain']} a")
    await page.wait_for_selector("pre.body.text")
    assert "this is plain text" in await page.inner_text("pre.body.text")
    assert await page.inner_text("h1.subject") == "Plain hello"

    # HTML: rendered in the sandboxed frame
    await page.go_back()
    await page.click(f"#m-{world.ids['html']} a")
    frame = page.frame_locator("iframe.body")
    assert await frame.locator("h1").inner_text() == "This week"
    assert await frame.locator("td").first.inner_text() == "Apples"
    assert await page.get_attribute("iframe.body", "sandbox") == "allow-popups allow-popups-to-escape-sandbox"
    await page.click("nav.views a")  # the plain-text alternative
    assert "plain text version of the newsletter" in await page.inner_text("pre.body.text")

    # multipart: the inline image shows (from data:), both attachments download
    await page.go_back()
    await page.go_back()
    await page.click(f"#m-{world.ids['multipart']} a")
    frame = page.frame_locator("iframe.body")
    width = await frame.locator("img").evaluate("img => img.complete ? img.naturalWidth : -1")
    assert width == 1  # the 1x1 PNG from the message itself
    names = await page.locator(".attachments .name").all_inner_texts()
    assert names == ["contract 2026.pdf", "요약.txt"]
    async with page.expect_download() as dl_info:
        await page.click(".attachments li:nth-child(2) a")
    dl = await dl_info.value
    assert dl.suggested_filename == "요약.txt"
    assert Path(await dl.path()).read_bytes() == "계약서 요약입니다.\n".encode()
    async with page.expect_download() as dl_info:
        await page.click("p.eml a")
    eml = await dl_info.value
    assert eml.suggested_filename == f"{world.ids['multipart']}.eml"
    raw = Path(await eml.path()).read_bytes()
    assert raw.startswith(b"Received: from client.test") and raw.endswith(world.bodies["multipart"])

    # Korean mail in ks_c_5601-1987
    await page.goto(world.url + "/")
    await page.click(f"#m-{world.ids['korean']} a")
    assert await page.inner_text("h1.subject") == "회의 일정 안내"
    assert "다음 주 회의는 화요일" in await page.inner_text("pre.body.text")

    assert watch.dialogs == [] and watch.foreign(world.url) == []
    # the queue is untouched: every message still waits for the primary
    out = world.node.cli("queue", "list", "--json").stdout
    states = {m["id"]: {r["state"] for r in m["recipients"]} for m in json.loads(out)["messages"]}
    assert all(states[q] == {"queued"} for q in world.ids.values())
    audit = world.node.cli("access", "audit", "--address", "alice@example.test").stdout
    assert " signin " in audit and " view " in audit and " download " in audit
    await ctx.close()


async def test_a_hostile_message_runs_no_script_and_loads_nothing_remote(world: World, browser: Any) -> None:
    ctx, watch = await context(browser)
    page = await ctx.new_page()
    await sign_in(page, link_for(world.node, "alice@example.test"))
    await page.click(f"#m-{world.ids['hostile']} a")
    frame = page.frame_locator("iframe.body")
    assert await frame.locator("h1").inner_text() == "Totally normal invoice"
    # the subject and sender are text, not markup
    assert await page.inner_text("h1.subject") == "<img src=x onerror=alert('subject')> Invoice"
    assert "<script>alert('from')</script>" in await page.inner_text("dd.from")
    assert await page.is_visible("#remote-blocked")
    # try the links and the form; nothing may happen
    await frame.locator("text=click me").click()
    await frame.locator("text=encoded").click()
    await frame.locator("text=data link").click()
    await page.wait_for_timeout(1500)  # time for a meta refresh, a lazy image, a timer
    assert page.url.startswith(world.url + "/m/")
    # the hostile attachment downloads, it is never rendered
    async with page.expect_download() as dl_info:
        await page.click(".attachments a")
    dl = await dl_info.value
    assert "onerror" in dl.suggested_filename and "/" not in dl.suggested_filename
    assert b"<script>alert('attachment')</script>" in Path(await dl.path()).read_bytes()
    await page.wait_for_timeout(500)
    assert watch.dialogs == [], watch.dialogs
    assert watch.foreign(world.url) == [], watch.foreign(world.url)
    assert world.recorder.hits == [], world.recorder.hits
    await ctx.close()


async def test_a_link_works_once_and_not_after_it_expires(world: World, browser: Any) -> None:
    link = link_for(world.node, "alice@example.test")
    ctx, _ = await context(browser)
    page = await ctx.new_page()
    await sign_in(page, link)
    other, _ = await context(browser)  # someone else with the same link, later
    p2 = await other.new_page()
    await p2.goto(link)
    assert await p2.inner_text("#refused h1") == "This sign-in link has already been used"
    assert not await p2.is_visible("#signin")
    resp = await p2.request.post(world.url + "/signin", form={"t": link.split("t=", 1)[1]})
    assert resp.status == 403
    resp = await p2.goto(world.url + "/")
    assert resp is not None and resp.status == 401  # no session was made
    # a link of a grant that has ended
    short = link_for(world.node, "carol@example.test", "--expires", "2s")
    await asyncio.sleep(2.5)
    await p2.goto(short)
    assert await p2.inner_text("#refused h1") == "This sign-in link has expired"
    await ctx.close()
    await other.close()


async def test_alice_cannot_open_bobs_message_by_changing_the_url(world: World, browser: Any) -> None:
    bob_ctx, _ = await context(browser)
    bob = await bob_ctx.new_page()
    await sign_in(bob, link_for(world.node, "bob@example.test"))
    bob_url = await bob.get_attribute(f"#m-{world.ids['bob']} a", "href")
    assert bob_url is not None
    ctx, watch = await context(browser)
    page = await ctx.new_page()
    await sign_in(page, link_for(world.node, "alice@example.test"))
    own = await page.get_attribute(f"#m-{world.ids['plain']} a", "href")
    assert own is not None
    _, _, own_id, own_tok = own.split("/")
    bob_id = bob_url.split("/")[2]
    for path in (
        bob_url,  # bob's real URL, leaked to alice
        f"/m/{bob_id}/{own_tok}",  # bob's queue ID with alice's token
        f"/m/{own_id[:-1]}{'A' if own_id[-1] != 'A' else 'B'}/{own_tok}",  # a guessed neighbour ID
        bob_url + "/eml",
        bob_url + "/frame",
        bob_url + "/part/0",
    ):
        resp = await page.goto(world.url + path)
        assert resp is not None and resp.status == 404, path
        assert await page.inner_text("#notice h1") == "This message is not available"
        assert "salary" not in await page.content()
    assert watch.dialogs == []
    audit = world.node.cli("access", "audit", "--address", "alice@example.test").stdout
    assert "view-refused" in audit
    await ctx.close()
    await bob_ctx.close()


async def test_phone_width_in_korean(world: World, browser: Any) -> None:
    ctx, watch = await context(
        browser, width=390, height=844, locale="ko-KR", extra_http_headers={"Accept-Language": "ko-KR,ko;q=0.9"}
    )
    page = await ctx.new_page()
    await page.goto(link_for(world.node, "alice@example.test"))
    assert await page.inner_text("#signin") == "로그인"
    await page.click("#signin")
    await page.wait_for_selector("ol.messages")
    assert "메일 서비스에 장애가 발생했습니다" in await page.inner_text("#outage-banner")
    assert await page.inner_text("#held-count") == "5통"
    no_sideways = "() => document.documentElement.scrollWidth <= window.innerWidth"
    assert await page.evaluate(no_sideways)
    await page.click(f"#m-{world.ids['multipart']} a")
    await page.wait_for_selector(".attachments")
    assert await page.evaluate(no_sideways)
    assert "첨부 파일" in await page.inner_text(".attachments h2")
    assert watch.dialogs == []
    with contextlib.suppress(Exception):
        await ctx.close()
