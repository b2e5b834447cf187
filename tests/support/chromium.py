"""Headless Chromium for the browser scenarios: where it is (BACKUPMX_CHROMIUM, default
/usr/bin/chromium), the flags it runs with, `needs_chromium` (a mark that skips a module without it) and
`launched_chromium()`, which always closes it. Importing this skips the importing test module when
playwright is not installed."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

playwright_api = pytest.importorskip("playwright.async_api")
CHROMIUM = os.environ.get("BACKUPMX_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")


@asynccontextmanager
async def launched_chromium() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            await b.close()
