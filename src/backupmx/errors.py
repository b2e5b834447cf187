"""The error tree. Outcomes of ordinary events (a refused recipient, a deferral) are values,
not exceptions; these are for surprises that cross a layer boundary.

    BackupMXError
    ├── ConfigError              bad configuration: names the file and key
    ├── SpoolError               the spool could not do what was asked
    │   ├── SpoolFullError       no space left (ENOSPC / SQLITE_FULL): answer 452 4.3.1
    │   ├── SpoolUnavailable     the database is unreachable or locked too long: answer 451 4.3.0
    │   ├── LeaseLost            an outcome for a lease this node no longer holds (not recorded)
    │   └── NotFound             no such queue entry
    └── RouteError               no usable route to a destination right now (defer, never bounce)
"""

from __future__ import annotations


class BackupMXError(Exception):
    pass


class ConfigError(BackupMXError):
    pass


class SpoolError(BackupMXError):
    pass


class SpoolFullError(SpoolError):
    pass


class SpoolUnavailable(SpoolError):
    pass


class LeaseLost(SpoolError):
    pass


class NotFound(SpoolError):
    pass


class RouteError(BackupMXError):
    pass
