"""The Postfix peer fixtures, for the tests of the support code itself."""

from tests.support.fixtures import (  # noqa: F401 (fixtures)
    postfix_backup,
    postfix_factory,
    postfix_primary,
    sink_factory,
    smtp_sink,
)
