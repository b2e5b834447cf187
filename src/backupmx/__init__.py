"""backupmx: a backup MX that accepts a domain's mail while its primary is down, holds it durably,
and hands every message to the primary once it is back."""

__version__ = "0.1.0"
