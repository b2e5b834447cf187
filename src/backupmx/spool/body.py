"""A message body being received: chunks go to memory up to a threshold, then to an unlinked
temporary file in the data directory, so a 50 MB message never needs 50 MB of RAM. Nothing here is
durable; durability comes from `Spool.put`, which copies the body into the spool and commits."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

MEMORY_THRESHOLD = 256 * 1024
CHUNK = 256 * 1024


class BodyBuffer:
    def __init__(self, tmp_dir: Path | None = None, threshold: int = MEMORY_THRESHOLD) -> None:
        self._file = cast(
            BinaryIO,
            tempfile.SpooledTemporaryFile(max_size=threshold, dir=str(tmp_dir) if tmp_dir else None),  # noqa: SIM115 (owned; closed by close())
        )
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._file.write(data)
        self.size += len(data)

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        self._file.seek(0)
        while True:
            block = self._file.read(size)
            if not block:
                return
            yield block

    def getvalue(self) -> bytes:
        """The whole body in memory; for small bodies and tests."""
        return b"".join(self.chunks())

    def close(self) -> None:
        self._file.close()

    @classmethod
    def from_bytes(cls, data: bytes, tmp_dir: Path | None = None) -> BodyBuffer:
        b = cls(tmp_dir)
        b.write(data)
        return b

    def __enter__(self) -> BodyBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
