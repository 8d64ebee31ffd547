"""The one error of the test harness."""

from __future__ import annotations

from connector.errors import ConnectorError


class HarnessError(ConnectorError):
    """A test's world could not be set up or did not behave: a server or daemon that does not start or exits,
    PostgreSQL out of reach, a command that failed. The message says which, and where its log is."""
