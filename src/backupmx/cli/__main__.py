"""`python -m backupmx.cli ...`: the same as the `backupmx` command (tests and benches start it this way)."""

import sys

from backupmx.cli import main

sys.exit(main())
