"""SMTP replies as values: a code, an enhanced status code (RFC 3463) and text.

Replies are built next to the rule that uses them; this module holds only the type and the few
replies that several layers share. Formatting never lets CR or LF from the text reach the wire.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass


# A byte that is not UTF-8 is read as Latin-1: primaries in the wild answer "f\xfcr" (Latin-1), and
# "für" is what the operator and the sender should read; every byte gives one character, so nothing
# is dropped. A named codec error handler keeps the decode one linear pass.
def _latin1(e: UnicodeError) -> tuple[str, int]:
    if isinstance(e, UnicodeDecodeError):
        return e.object[e.start : e.end].decode("latin-1"), e.end
    raise e


codecs.register_error("backupmx-latin1", _latin1)
_CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f]")  # all C0 but LF (which separates reply lines)


def readable(text: str | bytes) -> str:
    """Any reply text from a peer as valid UTF-8 fit for storage and DSNs: raw bytes or a str that
    carries them as surrogates (aiosmtplib decodes with surrogateescape) are read as UTF-8 where they
    are, Latin-1 where not; controls but LF become "?" (PostgreSQL text refuses NUL)."""
    if isinstance(text, bytes):
        raw = text
    else:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that does not stand for a byte
            raw = text.encode("utf-8", "replace")
    try:
        out = raw.decode("utf-8")
    except UnicodeDecodeError:
        out = raw.decode("utf-8", "backupmx-latin1")
    return _CONTROLS.sub("?", out)


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    status: str  # enhanced status code, "5.7.1"; "" where none applies (220 banner, 354)
    text: str

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        """The text split into reply lines, each without CR/LF."""
        parts = [p.replace("\r", " ") for p in self.text.split("\n")] or [""]
        return parts

    def to_bytes(self) -> bytes:
        lines = self.lines()
        out: list[str] = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            body = f"{self.status} {line}" if self.status else line
            out.append(f"{self.code}{sep}{body}".rstrip() + "\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        text = " ".join(self.lines())
        return f"{self.code} {self.status} {text}" if self.status else f"{self.code} {text}"

    @classmethod
    def parse(cls, text: str) -> Reply:
        """Reads back what `str(reply)` wrote (used for replies kept in the spool)."""
        code_s, _, rest = text.strip().partition(" ")
        try:
            code = int(code_s)
        except ValueError:
            return cls(451, "4.3.0", text)
        status, _, tail = rest.partition(" ")
        if status.count(".") == 2 and status[0] in "245":
            return cls(code, status, tail)
        return cls(code, "", rest)


OK = Reply(250, "2.0.0", "Ok")
SPOOL_FAILED = Reply(451, "4.3.0", "Error: queue file write error, try again later")
DISK_FULL = Reply(452, "4.3.1", "Insufficient system storage")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing transmission channel")
