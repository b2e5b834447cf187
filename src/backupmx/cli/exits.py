"""The exit codes every `backupmx` command uses: 0 done, 1 a failed action (a missing message, a copy
that left one behind, a fail mark of `check`), 2 usage or configuration."""

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
