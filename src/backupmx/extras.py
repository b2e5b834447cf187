"""The optional parts of backupmx: which Python module each needs and which pip extra brings it.

A configuration that asks for a part that is not installed fails with one line that says what to
install (`spool.url needs the PostgreSQL driver: pip install 'backupmx[postgres]'`), raised as a
ConfigError (exit 2), never a ModuleNotFoundError traceback. Parts that only make things faster
(uvloop) are never required: without them backupmx runs on the standard library's event loop.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass

from backupmx.errors import ConfigError


@dataclass(frozen=True, slots=True)
class OptionalPart:
    module: str  # the import name
    extra: str  # pip install 'backupmx[<extra>]'
    what: str  # for people: "the PostgreSQL driver"

    @property
    def install(self) -> str:
        return f"pip install 'backupmx[{self.extra}]'"


POSTGRES = OptionalPart("asyncpg", "postgres", "the PostgreSQL driver")
FAST_LOOP = OptionalPart("uvloop", "fast", "the fast event loop")
PARTS: tuple[OptionalPart, ...] = (POSTGRES, FAST_LOOP)


def installed(part: OptionalPart) -> bool:
    """Whether the part's module can be found, without importing it (a config check stays fast)."""
    if part.module in sys.modules:  # already imported, or blocked with sys.modules[name] = None
        return sys.modules[part.module] is not None
    try:
        return importlib.util.find_spec(part.module) is not None
    except (ImportError, ValueError):
        return False


def missing(part: OptionalPart, needed_by: str) -> ConfigError:
    """The one-line error for `needed_by` (a config key, or a command) when `part` is not installed."""
    return ConfigError(f"{needed_by} needs {part.what}: {part.install}")


def require(part: OptionalPart, needed_by: str) -> None:
    """Import the part's module, or raise the one-line ConfigError; a broken install (a compiled module
    built for another Python) fails the same way, with the import error appended."""
    try:
        importlib.import_module(part.module)
    except ImportError as e:
        err = missing(part, needed_by)
        if installed(part):
            err = ConfigError(f"{err} (installed but cannot be imported: {e})")
        raise err from None
