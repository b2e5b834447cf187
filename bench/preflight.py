"""What the Postfix-against-backupmx benches (accept.py, drain.py) do before they measure: stop cleanly on
SIGTERM, say why they cannot run (smtp-source and smtp-sink; Postfix unless only backupmx is measured),
print the machine line, and take a work folder that is removed when the bench's ExitStack closes."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

from bench.figures import machine_line
from bench.signals import exit_on_sigterm
from tests.support.postfix import postfix_unavailable_reason, tools_unavailable_reason


def cannot_run(*, postfix: bool) -> str | None:
    """Why the bench cannot run here (printed on stderr), or None."""
    exit_on_sigterm()
    for reason in (tools_unavailable_reason(), postfix_unavailable_reason() if postfix else None):
        if reason:
            print(f"cannot run: {reason}", file=sys.stderr)
            return reason
    print(machine_line(), flush=True)
    return None


def work_dir(stack: contextlib.ExitStack, name: str) -> Path:
    """A fresh temp folder for this bench's nodes, removed when `stack` closes."""
    work = Path(tempfile.mkdtemp(prefix=f"bmx-bench-{name}-"))
    stack.callback(shutil.rmtree, work, ignore_errors=True)
    return work
